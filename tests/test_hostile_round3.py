"""Hostile inputs, round 3 (issue 24): ``report`` never writes or reads outside its folder,
crafted folders and values get one line, nothing hangs.

Every CLI case asserts the exit code, exactly one stderr line for an error (none for a success),
no traceback, no file changed outside the command's output, and that it ends within a deadline
(SIGALRM raises a BaseException the CLI's boundary does not catch). The helpers of
:mod:`normscope.safe_io` are tested with links, FIFOs and folders in place of files, and on
read-only and full file systems (small tmpfs mounts, where the tests run as root)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

import normscope
from normscope.api import check_seed
from normscope.cli.app import app
from normscope.cli.boundary import printable
from normscope.errors import InvalidArgumentError, OutputError
from normscope.monitor.store import SCHEMA, RecordStore
from normscope.safe_io import csv_safe, list_files, read_bytes, write_file, write_text
from tests.cli_helpers import small_bn_net

REPO = Path(__file__).resolve().parents[1]
ME = "tests.test_hostile_round3"
MODEL = ["--model", "tests.cli_helpers:small_bn_net"]
QUICK = ["--analyzers", "stats", "--batches", "1", "--batch-size", "16"]
FORMULA = '=HYPERLINK("http:evil","click")'
SECRET = "secret-token-3141"
DEADLINE = 60
PROGRESS = re.compile(r"\(at [0-9.]+ s\)$")
runner = CliRunner()


# -- a user's code, named on the command line as tests.test_hostile_round3:NAME ---------------

FACTORY_CALLS = []


def counted_net() -> nn.Module:
    FACTORY_CALLS.append(1)
    return small_bn_net()


def formula_net() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(64, 16))
    model.add_module(FORMULA, nn.BatchNorm1d(16))
    model.add_module("head", nn.Linear(16, 10))
    return model


def meta_net() -> nn.Module:
    with torch.device("meta"):
        return small_bn_net()


def empty_data():
    return torch.empty(0, 64), torch.empty(0, dtype=torch.long)


class BreaksAt(Dataset):
    """64 flat digits-like examples; reading example 20 or later fails (a disk gone midway)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        if index >= 20:
            raise OSError("input/output error on shard 3")
        return torch.randn(64), index % 10


def breaking_loader() -> DataLoader:
    return DataLoader(BreaksAt(), batch_size=8)


# -- the harness ------------------------------------------------------------------------------

class Hung(BaseException):
    """Raised by SIGALRM: a case ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: int = DEADLINE):
    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, and content or link target."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            content = os.readlink(path) if stat.S_ISLNK(mode) else path.read_bytes() if stat.S_ISREG(mode) else None
            found[str(path.relative_to(root))] = (stat.S_IFMT(mode), content)
    return found


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def invoke(arguments: list[str], env: dict | None = None, seconds: int = DEADLINE):
    with deadline(seconds):
        return runner.invoke(app, arguments, env=env)


def check(result, code: int, words: str = "") -> str:
    """Exit ``code``; one stderr line holding ``words`` for an error, none for a success; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if code == 0:
        assert lines == [], result.stderr
        return ""
    assert len(lines) == 1 and words in lines[0], result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    """One analysis output folder, written by the CLI, for the cases to copy and damage."""
    out = tmp_path_factory.mktemp("analysis") / "out"
    check(invoke(["analyze", *MODEL, *QUICK, "--out", str(out)], seconds=300), 0)
    return out


@pytest.fixture
def world(tmp_path) -> Path:
    """``tmp_path`` holding a secret file and a victim file that no case may read or change."""
    (tmp_path / "secret.csv").write_text(f"site,value\n{SECRET},1\n")
    (tmp_path / "victim.txt").write_text("the victim's own data\n")
    return tmp_path


def run_folder(folder: Path, site: str = "layer.bn", values: list[float] | None = None) -> Path:
    """A monitor run folder written by the monitor's own store: R² of ``site`` over 6 steps."""
    store = RecordStore(folder, flush_seconds=0)
    for step, value in enumerate(values or [0.9, 0.9, 0.85, 0.3, 0.2, 0.1]):
        store.append(step, [(site, "r2_mean", value), (site, "eps_fraction_max", 0.1)])
    return folder


def tmpfs(path: Path, size: str, read_only: bool = False) -> Path:
    """Mount a tmpfs of ``size`` at ``path`` (unmounted by :func:`unmount`); skip without root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (the read-only and full file system cases)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here ({done.stderr.decode().strip()})")
    return path


@pytest.fixture
def mounts():
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


def make_tmpfs(mounts: list, path: Path, size: str) -> Path:
    mounts.append(tmpfs(path, size))
    return path


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


# -- 1. writing and reading outside the folder ----------------------------------------------------

def plant_links(run: Path, world: Path) -> None:
    (run / "_findings.csv").symlink_to(world / "victim.txt")
    (run / "._report.html.tmp").symlink_to(world / "victim.txt")
    (run / "._findings.csv.tmp").symlink_to(world / "victim.txt")


def plant_report_link(run: Path, world: Path) -> None:
    (run / "_report.html").symlink_to(world / "victim.txt")


@pytest.mark.parametrize("plant", [plant_links, plant_report_link], ids=["findings-and-temporaries", "report"])
def test_report_on_a_run_never_writes_through_planted_links(world, plant):
    run = run_folder(world / "run")
    plant(run, world)
    before = tree(world)
    check(invoke(["report", str(run)]), 0)
    assert changed(before, tree(world)) <= {"run/_report.html", "run/_findings.csv"}
    assert (world / "victim.txt").read_text() == "the victim's own data\n"
    for name in ("_report.html", "_findings.csv"):
        assert stat.S_ISREG(os.lstat(run / name).st_mode)


def drop_parquet_link_csv(folder: Path, world: Path) -> None:
    (folder / "tables" / "stats_sites.parquet").unlink()
    (folder / "tables" / "stats_sites.csv").unlink()
    (folder / "tables" / "stats_sites.csv").symlink_to(world / "secret.csv")


def link_new_table(folder: Path, world: Path) -> None:
    (folder / "tables" / "stats_extra.csv").symlink_to("../../secret.csv")


def link_summary(folder: Path, world: Path) -> None:
    shutil.move(folder / "summary.json", world / "summary.json")
    (folder / "summary.json").symlink_to(world / "summary.json")


def link_tables_folder(folder: Path, world: Path) -> None:
    shutil.move(folder / "tables", world / "tables")
    (folder / "tables").symlink_to(world / "tables")


def fifo_table(folder: Path, world: Path) -> None:
    (folder / "tables" / "stats_sites.parquet").unlink()
    (folder / "tables" / "stats_sites.csv").unlink()
    os.mkfifo(folder / "tables" / "stats_sites.csv")


def fifo_summary(folder: Path, world: Path) -> None:
    (folder / "summary.json").unlink()
    os.mkfifo(folder / "summary.json")


def folder_table(folder: Path, world: Path) -> None:
    (folder / "tables" / "stats_sites.parquet").unlink()
    (folder / "tables" / "stats_sites.parquet").mkdir()


def summary_of(content: str):
    def damage(folder: Path, world: Path) -> None:
        (folder / "summary.json").write_text(content)
    return damage


def meta_model_5(folder: Path, world: Path) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    summary["meta"]["model"] = 5
    (folder / "summary.json").write_text(json.dumps(summary))


def findings_without_sentence(folder: Path, world: Path) -> None:
    path = folder / "tables" / "findings.parquet"
    pd.read_parquet(path).drop(columns="sentence").to_parquet(path)


def malformed_csv(folder: Path, world: Path) -> None:
    (folder / "tables" / "stats_sites.parquet").unlink()
    (folder / "tables" / "stats_sites.csv").write_text('site,kind\n"bn,batchnorm\n1,2,3,4,5\n')


def corrupt_parquet(folder: Path, world: Path) -> None:
    path = folder / "tables" / "stats_sites.parquet"
    path.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")


CRAFTED = {
    "csv-linked-outside": (drop_parquet_link_csv, "symbolic link"),
    "new-table-linked-outside": (link_new_table, "symbolic link"),
    "summary-linked": (link_summary, "symbolic link"),
    "tables-folder-linked": (link_tables_folder, "symbolic link"),
    "fifo-table": (fifo_table, "FIFO"),
    "fifo-summary": (fifo_summary, "FIFO"),
    "folder-in-place-of-a-table": (folder_table, "is a folder"),
    "summary-null": (summary_of("null"), "summary.json: the content is null"),
    "summary-list": (summary_of("[1, 2]"), "summary.json: the content is a list"),
    "summary-wrong-types": (summary_of('{"findings": "x", "headline": 3}'), '"findings" is a string'),
    "summary-meta-model-5": (meta_model_5, '"meta"."model" is a number 5'),
    "summary-truncated": (summary_of('{"findings": {'), "summary.json is not valid JSON"),
    "summary-not-utf8": (lambda folder, world: (folder / "summary.json").write_bytes(b"\xff\xfe{}"), "summary.json is not valid JSON"),
    "findings-without-sentence": (findings_without_sentence, "findings.parquet lacks the column(s) sentence"),
    "malformed-csv": (malformed_csv, "stats_sites.csv is not a readable table"),
    "corrupt-parquet": (corrupt_parquet, "stats_sites.parquet is not a readable table"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_report_on_a_crafted_analysis_folder_is_one_line(analysis, world, name):
    damage, words = CRAFTED[name]
    folder = world / "out"
    shutil.copytree(analysis, folder)
    damage(folder, world)
    before = tree(world)
    check(invoke(["report", str(folder)], seconds=20), 1, words)
    assert changed(before, tree(world)) == set()


def test_a_linked_csv_shadowed_by_its_parquet_is_never_read(analysis, world):
    folder = world / "out"
    shutil.copytree(analysis, folder)
    (folder / "tables" / "stats_sites.csv").unlink()
    (folder / "tables" / "stats_sites.csv").symlink_to(world / "secret.csv")
    check(invoke(["report", str(folder)]), 0)
    assert SECRET not in (folder / "report.html").read_text()


def test_formula_cells_are_neutralised_in_csv_and_raw_in_parquet(tmp_path):
    out = tmp_path / "out"
    check(invoke(["analyze", "--model", f"{ME}:formula_net", *QUICK, "--out", str(out)], seconds=300), 0)
    neutralised = 0
    for path in (out / "tables").glob("*.csv"):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        cells = [c for column in table.columns for c in table[column]] + list(table.columns)
        assert not [c for c in cells if c.startswith(("=", "+", "@", "\t", "\r"))], path.name
        neutralised += sum(c.startswith("'" + FORMULA) for c in cells)
    assert neutralised >= 2
    assert FORMULA in set(pd.read_parquet(out / "tables" / "stats_sites.parquet")["site"])
    run = run_folder(tmp_path / "run", site=FORMULA)
    check(invoke(["report", str(run)]), 0)
    findings = pd.read_csv(run / "_findings.csv", dtype=str)
    assert len(findings) and set(findings["site"]) == {"'" + FORMULA} and findings["finding"].str.startswith("'=").all()


def test_csv_safe_follows_owasp_and_leaves_numbers_alone():
    table = pd.DataFrame({"text": ["=1+1", "+1", "-x", "@SUM(A1)", "\tcmd", "\rcmd", "plain", "a=b"], "number": [-1.5] * 8})
    safe = csv_safe(table)
    assert safe["text"].tolist() == ["'=1+1", "'+1", "'-x", "'@SUM(A1)", "'\tcmd", "'\rcmd", "plain", "a=b"]
    assert safe["number"].tolist() == [-1.5] * 8 and table["text"][0] == "=1+1"


def test_control_characters_in_a_path_are_escaped_on_the_terminal(tmp_path):
    path = tmp_path / "ckpt\x1b]0;owned\x07\x1b[31m\u202e.pt"
    result = invoke(["analyze", str(path), *MODEL, "--out", str(tmp_path / "out")])
    line = check(result, 1, "checkpoint file not found")
    assert "\x1b" not in result.output and "\x07" not in result.output and "\u202e" not in result.output
    assert "\\x1b]0;owned\\x07\\x1b[31m\\u202e.pt" in line
    assert printable("a\tb é 中") == "a\\tb é 中"


def zip_bomb(path: Path, inflated: int) -> Path:
    """A torch.save archive of a small state dict whose first tensor member is replaced by a
    deflated member of ``inflated`` zero bytes."""
    source = io.BytesIO()
    torch.save(small_bn_net().state_dict(), source)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as bomb:
        for info in archive.infolist():
            if info.filename.endswith("/data/0"):
                bomb.writestr(info.filename, bytes(inflated), compress_type=zipfile.ZIP_DEFLATED)
            else:
                bomb.writestr(info, archive.read(info))
    return path


def test_a_zip_bomb_is_refused_before_anything_is_inflated(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.pt", 256 << 20)
    assert bomb.stat().st_size < 1 << 20
    started = time.perf_counter()
    result = invoke(["analyze", str(bomb), *MODEL, "--out", str(tmp_path / "out")], seconds=30)
    check(result, 1, "bytes once decompressed")
    expected = sum(t.numel() * t.element_size() for t in small_bn_net().state_dict().values())
    assert f"model's {expected:,} tensor bytes" in result.stderr
    assert time.perf_counter() - started < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.pt"]


def test_a_re_compressed_archive_within_the_model_bytes_still_loads(tmp_path):
    source = io.BytesIO()
    torch.save(small_bn_net().state_dict(), source)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, archive.read(info))
    from normscope.checkpoint import load_model

    loaded = load_model(path, "tests.cli_helpers:small_bn_net")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small_bn_net().state_dict().values()))


# -- 2. hangs and internal errors on crafted input ------------------------------------------------

def zero_rows_only(run: Path) -> None:
    for part in run.glob("part-*.parquet"):
        part.unlink()
    pq.write_table(SCHEMA.empty_table(), run / "part-000-1-000000.parquet")


def zero_rows_extra(run: Path) -> None:
    pq.write_table(SCHEMA.empty_table(), run / "part-000-1-999999.parquet")


def without_rank(run: Path) -> None:
    part = sorted(run.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(part).drop_columns(["rank"]), part)


def corrupt_part(run: Path) -> None:
    sorted(run.glob("part-*.parquet"))[0].write_bytes(b"PAR1 not really")


def fifo_part(run: Path) -> None:
    os.mkfifo(run / "part-000-1-999999.parquet")


def linked_part(run: Path) -> None:
    outside = run.parent / "outside.parquet"
    shutil.copy(sorted(run.glob("part-*.parquet"))[0], outside)
    (run / "part-000-1-999999.parquet").symlink_to(outside)


def all_infinite(run: Path) -> None:
    for part in run.glob("part-*.parquet"):
        table = pq.read_table(part)
        values = [float("inf") if i % 2 else -float("inf") for i in range(table.num_rows)]
        pq.write_table(table.set_column(4, "value", pa.array(values, pa.float64())), part)


RUNS = {
    "zero-row-part-only": (zero_rows_only, 1, "holds no monitor rows"),
    "zero-row-part-among-others": (zero_rows_extra, 0, ""),
    "part-without-rank": (without_rank, 1, "lacks the column(s) rank"),
    "corrupt-part": (corrupt_part, 1, "is not a readable Parquet part"),
    "fifo-part": (fifo_part, 1, "is a FIFO"),
    "linked-part": (linked_part, 1, "is a symbolic link"),
    "all-values-infinite": (all_infinite, 0, ""),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_report_on_a_crafted_run_folder(world, name):
    damage, code, words = RUNS[name]
    run = run_folder(world / "run")
    damage(run)
    before = tree(world)
    check(invoke(["report", str(run)], seconds=30), code, words)
    allowed = {"run/_report.html", "run/_findings.csv"} if code == 0 else set()
    assert changed(before, tree(world)) == allowed


ANALYZE = {
    "device-meta": (["--device", "meta"], 1, "normscope runs on CPU or CUDA"),
    "device-xla": (["--device", "xla"], 1, "normscope runs on CPU or CUDA"),
    "device-mps": (["--device", "mps"], 1, "normscope runs on CPU or CUDA"),
    "seed-2**70": (["--seed", str(2**70)], 2, "usage error"),
    "sites-nomatch": (["--sites", "nomatch"], 1, "matches none of the 1 normalization sites: 2"),
    "sites-bad-bracket": (["--sites", "*["], 1, "matches none of the 1 normalization sites: 2"),
    "empty-data-tuple": (["--data", f"{ME}:empty_data"], 1, "holds no examples"),
    "loader-raising-midway": (["--data", f"{ME}:breaking_loader", "--batches", "4"], 1,
                              "the data loader DataLoader(BreaksAt) raised on batch 2 (OSError"),
    "meta-device-model": (["--model", f"{ME}:meta_net"], 1, "on the meta device"),
}


@pytest.mark.parametrize("name", list(ANALYZE))
def test_analyze_refuses_bad_values_in_one_line(tmp_path, name):
    arguments, code, words = ANALYZE[name]
    before = tree(tmp_path)
    check(invoke(["analyze", *MODEL, *QUICK, "--out", str(tmp_path / "out"), *arguments]), code, words)
    assert changed(before, tree(tmp_path)) == set()


ENVIRONMENTS = {
    "world-size-abc": ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
    "rank-x": ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not an integer"),
    "rank-beyond-world": ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "not below WORLD_SIZE=2"),
    "no-master": ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    "port-out-of-range": ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
}


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_launch_environment_is_checked_inside_the_boundary(tmp_path, name):
    env, words = ENVIRONMENTS[name]
    check(invoke(["analyze", *MODEL, *QUICK, "--out", str(tmp_path / "out")], env=env), 1, words)
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_with_a_bad_world_size_is_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "abc", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "normscope.cli", "analyze", *MODEL, "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "WORLD_SIZE='abc'" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("link", ["to-an-empty-folder", "dangling"])
def test_a_symlinked_out_is_refused_before_the_analysis(tmp_path, link):
    target = tmp_path / "target"
    if link == "to-an-empty-folder":
        target.mkdir()
    (tmp_path / "out").symlink_to(target)
    before, calls = tree(tmp_path), len(FACTORY_CALLS)
    line = check(invoke(["analyze", "--model", f"{ME}:counted_net", *QUICK, "--out", str(tmp_path / "out")]), 1, "is a symbolic link")
    assert len(FACTORY_CALLS) == calls and "someone else" not in line
    assert changed(before, tree(tmp_path)) == set()


def test_the_api_refuses_a_meta_model_a_bad_device_and_a_huge_seed():
    with pytest.raises(InvalidArgumentError, match="meta device"):
        normscope.analyze(meta_net(), analyzers="stats", batches=1)
    for bad in ({"device": "meta"}, {"device": "mps"}, {"seed": 2**70}, {"seed": -1}, {"seed": 1.5}):
        with pytest.raises(InvalidArgumentError):
            normscope.analyze(small_bn_net(), analyzers="stats", batches=1, **bad)
    check_seed(np.int64(2**63 - 1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    torch.save(small_bn_net().state_dict(), path)
    return path


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_recalibrate_onto_an_existing_folder_is_one_line(tmp_path, checkpoint, overwrite):
    (tmp_path / "fixed.pt").mkdir()
    (tmp_path / "fixed.pt" / "keep").write_text("kept")
    before = tree(tmp_path)
    flags = ["--overwrite"] if overwrite else []
    check(invoke(["recalibrate", str(checkpoint), *MODEL, "--out", str(tmp_path / "fixed.pt"), *flags]), 1, "is a folder")
    assert changed(before, tree(tmp_path)) == set()


def test_recalibrate_with_a_loader_raising_midway_is_one_line(tmp_path, checkpoint):
    arguments = ["recalibrate", str(checkpoint), *MODEL, "--data", f"{ME}:breaking_loader", "--out", str(tmp_path / "fixed.pt")]
    check(invoke(arguments), 1, "the data loader DataLoader(BreaksAt) raised on batch 2")
    assert list(tmp_path.iterdir()) == []


def test_recalibrate_on_a_full_file_system_is_one_line_and_leaves_nothing(tmp_path, checkpoint, mounts):
    small = make_tmpfs(mounts, tmp_path / "small", "4k")
    check(invoke(["recalibrate", str(checkpoint), *MODEL, "--out", str(small / "fixed.pt")], seconds=120), 1, "nothing was changed")
    assert list(small.iterdir()) == []


def dropout_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 10))


def test_fixed_dropout_queues_no_seeding_of_every_cuda_device():
    """On a machine without CUDA ``torch.manual_seed`` queues ``manual_seed_all`` for every CUDA
    device (applied when CUDA initializes, after any restore); fixed masks must not."""
    tracker, model = torch.cuda._lazy_seed_tracker, dropout_net()
    before = list(tracker.get_calls())
    result = normscope.analyze(model, analyzers="gls", batches=1, batch_size=16, random_layers="fixed")
    assert "fixed masks" in result.meta["random_layers"] and "dropout x" in result.meta["random_layers"]
    assert list(tracker.get_calls()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (not measured here)")
def test_cuda_generators_come_back_after_a_cuda_analysis_with_fixed_dropout():
    torch.cuda.init()
    states = torch.cuda.get_rng_state_all()
    normscope.analyze(dropout_net(), analyzers="gls", batches=1, batch_size=16, random_layers="fixed", device="cuda:0")
    assert all(torch.equal(a, b) for a, b in zip(states, torch.cuda.get_rng_state_all()))


# -- 3. the helpers -------------------------------------------------------------------------------

def test_write_file_replaces_a_link_a_fifo_and_keeps_what_it_points_to(world):
    (world / "link").symlink_to(world / "victim.txt")
    os.mkfifo(world / "pipe")
    for name in ("link", "pipe"):
        with deadline(10):
            write_text(world / name, "new")
        assert stat.S_ISREG(os.lstat(world / name).st_mode) and (world / name).read_text() == "new"
    assert (world / "victim.txt").read_text() == "the victim's own data\n"


def test_write_file_refuses_a_folder_and_cleans_up_after_an_interrupt(world):
    (world / "table.csv").mkdir()
    with pytest.raises(OutputError, match="it is a folder"):
        write_text(world / "table.csv", "x")
    (world / "page.html").write_text("old")

    def interrupted(stream):
        stream.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file(world / "page.html", interrupted)
    assert (world / "page.html").read_text() == "old"
    assert sorted(p.name for p in world.iterdir()) == ["page.html", "secret.csv", "table.csv", "victim.txt"]


def test_write_file_on_read_only_and_full_file_systems(tmp_path, mounts):
    full = make_tmpfs(mounts, tmp_path / "full", "8k")
    write_text(full / "page.html", "old")
    with pytest.raises(OutputError, match="No space left on device"):
        write_text(full / "page.html", "x" * 64 * 1024)
    assert (full / "page.html").read_text() == "old" and [p.name for p in full.iterdir()] == ["page.html"]
    remount_read_only(full)
    with pytest.raises(OutputError, match="Read-only file system"):
        write_text(full / "page.html", "new")
    assert (full / "page.html").read_text() == "old"


def test_read_bytes_refuses_links_fifos_folders_and_paths_outside(world):
    folder = world / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "ok.csv").write_text("a\n1\n")
    (folder / "link.csv").symlink_to(world / "secret.csv")
    (folder / "linked").symlink_to(folder / "sub")
    os.mkfifo(folder / "pipe.csv")
    assert read_bytes(folder / "sub" / "ok.csv", folder) == b"a\n1\n"
    cases = {
        "link.csv": "link.csv is a symbolic link, not a regular file",
        "linked/ok.csv": "linked is a symbolic link, not a folder",
        "pipe.csv": "pipe.csv is a FIFO, not a regular file",
        "sub": "sub is a folder, not a regular file",
        "missing.csv": "cannot read",
        "../secret.csv": "not a file inside",
    }
    for name, words in cases.items():
        with deadline(10), pytest.raises(OutputError, match=words.replace(".", r"\.")):
            read_bytes(folder / name, folder)
    with pytest.raises(OutputError, match="not inside"):
        read_bytes(world / "secret.csv", folder)
    with pytest.raises(OutputError, match="linked is a symbolic link, not a folder"):
        list_files(folder / "linked", folder, (".csv",))
    assert list_files(folder, folder, (".csv",)) == [folder / "link.csv", folder / "pipe.csv"]
