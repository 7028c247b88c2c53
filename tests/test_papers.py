"""The reproduction harness (benchmarks/papers.py) in its --quick form: every variant of every
experiment runs, every claim gets a row, and the Appendix C check runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_harness_runs_every_variant(tmp_path):
    out = tmp_path / "reproductions.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "papers.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import papers
    finally:
        sys.path.pop(0)
    for claim in papers.CLAIMS:
        assert claim.text in text
    for experiment in papers.experiments(quick=True):
        for variant in experiment.variants:
            assert f"| {variant.label} | 3 |" in text, variant.label
    assert text.count("inconclusive (one seed)") == len(papers.CLAIMS)
    assert "relative difference of the parameter gradients" in text
