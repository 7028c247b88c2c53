"""The reproduction harness (benchmarks/papers.py) in its --quick form: every variant of every
experiment runs on every data set, every claim gets a row per data set with its paired interval,
the LS grid is picked on the selection seeds, and the Appendix C check runs for both starts."""

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
        experiment = next(e for e in papers.experiments(quick=True) if e.name == claim.experiment)
        assert text.count(f"| {claim.text} |") == len(experiment.datasets), claim.text
    for experiment in papers.experiments(quick=True):
        for variant in experiment.variants:
            assert text.count(f"| {variant.label} | 2 |") >= len(experiment.datasets), variant.label
    for start in papers.LS_STARTS:
        for pick in ("best", "worst"):
            assert f"| {papers.ls_label(pick, start)} | 2 |" in text
    assert text.count("| 95% [") + text.count("| 90% [") == sum(
        len(next(e for e in papers.experiments(quick=True) if e.name == c.experiment).datasets) for c in papers.CLAIMS)
    assert "grad_init zero" in text and "grad_init first" in text
