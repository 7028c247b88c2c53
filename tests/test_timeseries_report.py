"""The run-folder report: findings over time, and `normscope train` / `normscope report RUN_DIR` end to end."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from normscope.cli.app import app
from normscope.reports.timeseries import FINDINGS_FILE, findings


def _rows(records: list[tuple[int, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([(s, 0, site, m, v) for s, site, m, v in records], columns=["step", "rank", "site", "metric", "value"])


def test_findings_name_the_step_of_a_fall_and_of_lr_beyond_the_stability_limit():
    r2 = [0.62, 0.60, 0.61, 0.30, 0.10, 0.08]
    records = [(100 * i, "layer3.1.bn2", "r2_mean", v) for i, v in enumerate(r2)]
    records += [(100 * i, "model", "lr", 0.1) for i in range(6)]
    records += [(100 * i, "model", "stability_limit", v) for i, v in enumerate([0.5, 0.3, 0.2, 0.09, 0.05, 0.04])]
    found = findings(_rows(records))
    assert list(found["finding"]) == ["layer3.1.bn2: R² fell from 0.62 to 0.08 after step 300",
                                      "lr exceeded 2/λ_max from step 300"]
    assert findings(_rows([(s, "a", "r2_mean", 0.5 + 0.01 * s) for s in range(5)])).empty


def test_train_and_report_commands_write_a_page_with_every_site(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--epochs", "1", "--every", "3", "--every-curvature", "20"])
    assert result.exit_code == 0, result.output
    page = out / "_report.html"
    assert str(page) in result.output and page.exists()
    rows = pd.read_parquet(out)
    assert set(rows.loc[rows["metric"] == "lambda_max", "step"]) == {0, 20}
    page.unlink()
    again = runner.invoke(app, ["report", str(out)])
    assert again.exit_code == 0 and page.exists(), again.output
    text = page.read_text()
    for site in ("net.2", "net.5"):
        assert f"<h3>{site}</h3>" in text
    assert text.count("data:image/png;base64,") == 3 and (out / FINDINGS_FILE).exists()
