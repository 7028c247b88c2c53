"""``normscope recalibrate``, ``sites --json``, ``report`` on a compare folder and the help text."""

from __future__ import annotations

import json
import re

import torch
from typer.testing import CliRunner

from normscope.cli.app import app
from normscope.compare import compare as run_compare
from normscope.data import load_digits
from normscope.result import TABLES_DIR, write_tables
from normscope.train import train_reference
from tests.cli_helpers import small_bn_net

runner = CliRunner()


def test_recalibrate_writes_a_fixed_copy_and_leaves_the_original(tmp_path):
    model = train_reference(epochs=2)
    model.net[2].running_var.mul_(100)
    stale = tmp_path / "stale.pt"
    torch.save(model.state_dict(), stale)
    original = stale.read_bytes()
    run = runner.invoke(app, ["recalibrate", str(stale), "--model", "mlp_bn", "--out", str(tmp_path / "fixed.pt")])
    assert run.exit_code == 0, run.output
    assert stale.read_bytes() == original
    accuracies = [float(v) for v in re.findall(r"(\d+)%", run.stdout)]
    assert len(accuracies) == 2 and accuracies[0] < 50 < 90 < accuracies[1]
    fixed = torch.load(tmp_path / "fixed.pt")
    x, _ = load_digits(split="train")
    with torch.no_grad():
        h = model.net[1](model.net[0](x))
    assert torch.allclose(fixed["net.2.running_mean"], h.mean(0), atol=1e-5)
    assert torch.allclose(fixed["net.2.running_var"], h.var(0), rtol=1e-4)
    again = runner.invoke(app, ["recalibrate", str(stale), "--model", "mlp_bn", "--out", str(tmp_path / "fixed.pt")])
    assert again.exit_code == 1 and "already exists" in again.stderr
    same = runner.invoke(app, ["recalibrate", str(stale), "--model", "mlp_bn", "--out", str(stale), "--overwrite"])
    assert same.exit_code == 1 and "never overwritten" in same.stderr and stale.read_bytes() == original


def test_recalibrate_refuses_a_model_without_running_statistics(tmp_path):
    path = tmp_path / "ln.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 10)), path)
    run = runner.invoke(app, ["recalibrate", str(path), "--trust", "--out", str(tmp_path / "out.pt")])
    assert run.exit_code == 1 and "nothing to recalibrate" in run.stderr and not (tmp_path / "out.pt").exists()


def test_sites_json_has_full_names(tmp_path):
    torch.save(small_bn_net().state_dict(), tmp_path / "user.pt")
    listed = runner.invoke(app, ["sites", str(tmp_path / "user.pt"), "--model", "tests.cli_helpers:small_bn_net", "--json"])
    assert listed.exit_code == 0
    assert json.loads(listed.stdout)["sites"] == [{"name": "2", "kind": "batchnorm", "module_type": "BatchNorm1d", "functional": False}]
    table = runner.invoke(app, ["sites", "--model", "resnet_bn"], env={"COLUMNS": "40"})
    assert "layer2.0.downsample.1" in table.stdout and "…" not in table.stdout


def test_report_renders_a_compare_folder_on_its_own(tmp_path):
    images, labels = load_digits()
    data = (images[:96], labels[:96], images[1400:1464], labels[1400:1464])
    result = run_compare("mlp_bn", ("bn", "renorm"), batch_sizes=(8,), steps=3, points=2, data=data)
    write_tables(tmp_path / TABLES_DIR, result.tables)
    run = runner.invoke(app, ["report", str(tmp_path)])
    assert run.exit_code == 0, run.output
    page = (tmp_path / "report.html").read_text()
    assert 'data-figure="compare_curves"' in page and "data:image/png;base64," in page


def test_help_shows_defaults_and_flags():
    text = runner.invoke(app, ["analyze", "--help"], env={"COLUMNS": "200"}).stdout
    assert "normscope-out/<UTC time>" in text and "the built-in's training lr" in text
    assert re.search(r"--trust\s+Allow", text) and re.search(r"--overwrite\s+Replace", text)
