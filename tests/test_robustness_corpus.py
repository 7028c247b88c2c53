"""The robustness corpus: nothing a user feeds normscope crashes it, corrupts their state, or
runs code they did not ask for (issue 12). Each CLI case asserts the exit code, the exact
number of stderr lines (one, unless the case produces none) and that no file is left behind,
staging folders included; each state case asserts the identity of tensors, version counters,
``.grad`` objects, hooks, flags and random generator states."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import normscope
from normscope.analyzers import ANALYZERS
from normscope.checkpoint import import_attribute, load_model
from normscope.cli.app import app
from normscope.errors import CheckpointError, NormscopeError, OutputError
from normscope.guard import differences, preserved, snapshot
from normscope.output import MARKER, write_folder_atomic
from normscope.result import AnalysisResult
from tests import robustness_helpers as helpers

REPO = Path(__file__).resolve().parents[1]
H = "tests.robustness_helpers"
runner = CliRunner()
QUICK = ["--analyzers", "stats", "--batches", "1", "--batch-size", "16"]


PROGRESS = re.compile(r"\(at [0-9.]+ s\)$")


def stderr_lines(result) -> list[str]:
    """The stderr lines, without the progress log lines a non-terminal gets (``... (at 1.2 s)``)."""
    return [line for line in result.stderr.strip().splitlines() if line.strip() and not PROGRESS.search(line)]


def leftovers(folder: Path, expected: set[str]) -> set[str]:
    """Names in ``folder`` (hidden staging folders included) other than ``expected``."""
    return {p.name for p in folder.iterdir()} - expected


def one_error(result, code: int, words: str) -> None:
    lines = stderr_lines(result)
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "Traceback" not in result.output


# -- 1. analyzer failures are isolated --------------------------------------------------------

@pytest.mark.parametrize("error", helpers.RAISED, ids=lambda e: e.__name__)
def test_a_failing_analyzer_is_recorded_and_the_others_still_run(monkeypatch, error):
    monkeypatch.setitem(ANALYZERS, "buggy", f"{H}:fails_with_{error.__name__}")
    result = normscope.analyze(helpers.bn_net(), helpers.digits_loader(), analyzers="stats,buggy", batches=1)
    message = result.meta["analyzer_errors"]["buggy"]
    assert message.startswith(f"analyzer buggy failed ({error.__name__}: ") and "analyzer bug" in message
    assert result.meta["analyzers"] == ["stats"] and "stats_sites" in result.tables


def test_cli_warns_once_per_failure_and_writes_it_to_summary_and_report(tmp_path, monkeypatch):
    monkeypatch.setitem(ANALYZERS, "buggy", f"{H}:failing_analyzer")
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", "--data", f"{H}:digits_loader", *QUICK[2:],
                                 "--analyzers", "stats,buggy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert stderr_lines(result) == ["normscope: warning: analyzer buggy failed (RuntimeError: analyzer bug)"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["analyzer_errors"] == {"buggy": "analyzer buggy failed (RuntimeError: analyzer bug)"}
    assert leftovers(tmp_path, {"out"}) == set()


def test_cli_exits_1_when_no_analyzer_produced_anything(tmp_path, monkeypatch):
    monkeypatch.setitem(ANALYZERS, "buggy", f"{H}:failing_analyzer")
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", "--analyzers", "buggy", "--batches", "1", "--out", str(tmp_path / "o")])
    one_error(result, 1, "no analyzer could run: analyzer buggy failed (RuntimeError: analyzer bug)")
    assert leftovers(tmp_path, set()) == set()


def test_an_internal_error_outside_the_analyzers_keeps_exit_2_and_names_debug(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("bug in normscope")

    monkeypatch.setattr("normscope.cli.analyze.print_summary", broken)
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(tmp_path / "o")])
    one_error(result, 2, "internal error (TypeError: bug in normscope); rerun with --debug")


INPUTS = [
    # (id, model factory, loader, analyzers that must run)
    ("batchnorm affine=False", "bn_no_affine", "digits_loader", {"stats", "gls", "descent"}),
    ("batchnorm track_running_stats=False", "bn_no_running_stats", "digits_loader", {"stats", "gls", "descent"}),
    ("weight-norm parametrization", "weight_norm_net", "digits_loader", {"stats", "gls", "bias"}),
    ("batch of one example", "bn_net", "one_example_loader", {"bias"}),
    ("overflowing activations", "bn_net", "overflow_loader", {"stats", "bias"}),
    ("user's full backward hook", "backward_hooked_net", "digits_loader", {"stats", "gls", "descent"}),
    ("nn.DataParallel", "data_parallel_net", "digits_loader", {"stats", "gls", "bias", "descent"}),
    ("loader raising midway", "bn_net", "raising_loader", {"stats", "gls", "descent"}),
]


@pytest.mark.parametrize("case", INPUTS, ids=[c[0] for c in INPUTS])
def test_hard_inputs_run_every_analyzer_that_can_and_name_the_others(tmp_path, case):
    _, factory, loader, must_run = case
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", "--model", f"{H}:{factory}", "--data", f"{H}:{loader}", "--batches", "1",
                                 "--batch-size", "16", "--budget", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = AnalysisResult.load(out).meta
    assert must_run <= set(meta["analyzers"]), meta["analyzer_errors"]
    lines = stderr_lines(result)
    assert len(lines) == len(meta["analyzer_errors"]) and all(line.startswith("normscope: warning: analyzer ") for line in lines)
    page = (out / "report.html").read_text()
    assert all(message.split(" (")[0].split(":")[0] in page for message in meta["analyzer_errors"].values())
    assert "Traceback" not in result.output and leftovers(tmp_path, {"out"}) == set()


# -- 2. the user's autograd state --------------------------------------------------------------

def user_state():
    """A user's model mid-training: gradients held, a forward hook, a built graph."""
    model = helpers.bn_net().train()
    images, labels = helpers.digits_loader().dataset.tensors
    torch.nn.functional.cross_entropy(model(images[:16]), labels[:16]).backward()
    calls = []
    model[1].register_forward_hook(lambda module, args, output: calls.append(1))
    return model, images, labels


def assert_same_session(model, state, grads):
    assert differences(model, state, session=True) == []
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


def test_a_graph_built_before_the_analysis_still_runs_backward():
    model, images, labels = user_state()
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images[:16]), labels[:16])
    normscope.analyze(model, (images, labels), analyzers="stats,gls", batch_size=16, batches=1)
    loss.backward()
    expected = helpers.bn_net().train()
    expected.load_state_dict(model.state_dict())
    torch.nn.functional.cross_entropy(expected(images[:16]), labels[:16]).backward()
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("analyzers", ["stats", "gls", "bias", "descent"])
def test_analysis_keeps_tensors_versions_grads_hooks_flags_and_rngs(analyzers):
    model, images, labels = user_state()
    grads = [p.grad for p in model.parameters()]
    state = snapshot(model)
    np.random.rand(), random.random()
    state = snapshot(model)
    normscope.analyze(model, (images, labels), analyzers=analyzers, batch_size=16, batches=1)
    assert_same_session(model, state, grads)


def test_backward_inside_capture_does_not_accumulate_into_held_gradients():
    model, images, labels = user_state()
    held = [p.grad for p in model.parameters()]
    values = [g.clone() for g in held]
    with normscope.capture(model):
        torch.nn.functional.cross_entropy(model(images[:16]), labels[:16]).backward()
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(model.parameters(), held, values, strict=True))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_analyze_works_inside_grad_disabled_contexts_and_restores_the_mode(context):
    model, images, labels = user_state()
    state, grads = snapshot(model), [p.grad for p in model.parameters()]
    with context():
        data = (images.clone(), labels.clone())
        result = normscope.analyze(model, data, analyzers="stats,gls", batch_size=16, batches=1)
        assert not torch.is_grad_enabled()
    assert result.meta["analyzer_errors"] == {} and "gls_sites" in result.tables
    assert_same_session(model, state, grads)


def test_analyze_failing_on_bad_data_leaves_everything_as_it_was():
    model, images, labels = user_state()
    wrong = (torch.randn(8, 3, 5, 5), labels[:8])
    state, grads = snapshot(model), [p.grad for p in model.parameters()]
    with pytest.raises(NormscopeError):
        normscope.analyze(model, wrong, batch_size=4, batches=1)
    assert_same_session(model, state, grads)


def test_no_cuda_seeding_is_left_behind():
    queued = len(getattr(torch.cuda, "_queued_calls", []))
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    normscope.analyze(helpers.bn_net(), helpers.digits_loader(), analyzers="stats", batches=1)
    assert len(getattr(torch.cuda, "_queued_calls", [])) == queued
    if cuda_state is not None:
        assert all(torch.equal(a, b) for a, b in zip(cuda_state, torch.cuda.get_rng_state_all()))


def test_restore_writes_only_changed_tensors_and_puts_objects_back():
    model = helpers.bn_net()
    weight, bias = model[1].weight, model[1].bias
    state = snapshot(model)
    with preserved(model):
        with torch.no_grad():
            weight.add_(1.0)
        model[1].bias = nn.Parameter(torch.zeros(16))
        model[2].register_forward_pre_hook(lambda module, args: None)
        torch.rand(3)
    assert model[1].weight is weight and model[1].bias is bias
    assert differences(model, state, session=True) == []


def test_differences_name_versions_grad_objects_hooks_and_rngs():
    model = helpers.bn_net()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    state = snapshot(model)
    with torch.no_grad():
        model[1].weight.mul_(1.0)
    model[1].bias.grad = model[1].bias.grad.clone()
    model[2].register_forward_hook(lambda *args: None)
    torch.rand(1)
    found = differences(model, state, session=True)
    assert {"version 1.weight", "grad object 1.bias", "hooks module 2", "rng torch cpu"} <= set(found)


# -- 3. no code from the working directory -----------------------------------------------------

def test_importing_a_user_module_leaves_sys_path_and_argv_as_they_were(tmp_path, monkeypatch):
    (tmp_path / "corpus_user_model.py").write_text(
        "import sys\nARGV = list(sys.argv)\nfrom tests.robustness_helpers import bn_net\n"
    )
    monkeypatch.chdir(tmp_path)
    path, argv = list(sys.path), list(sys.argv)
    factory = import_attribute("corpus_user_model", "bn_net", "corpus_user_model:bn_net", "--model")
    assert callable(factory) and sys.modules["corpus_user_model"].ARGV == ["corpus_user_model:bn_net"]
    assert sys.path == path and sys.argv == argv


@pytest.mark.parametrize("source, words", [
    ("raise SystemExit(4)", "cannot import module 'corpus_exits' (SystemExit: 4)"),
    ("import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--lr', required=True)\nparser.parse_args()",
     "(SystemExit: 2; it printed: corpus_exits:net: error: the following arguments are required: --lr)"),
])
def test_a_module_exiting_or_parsing_argv_at_import_is_contained(tmp_path, monkeypatch, source, words):
    (tmp_path / "corpus_exits.py").write_text(source + "\n")
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("corpus_exits", None)
    result = runner.invoke(app, ["analyze", "--model", "corpus_exits:net", *QUICK, "--out", str(tmp_path / "o")])
    assert result.exit_code in (1,), result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and words in lines[-1], result.stderr
    assert leftovers(tmp_path, {"corpus_exits.py"}) == set()


def test_a_factory_raising_system_exit_is_one_line(tmp_path):
    result = runner.invoke(app, ["analyze", "--model", f"{H}:exits_on_call", *QUICK, "--out", str(tmp_path / "o")])
    one_error(result, 1, "calling exits_on_call() failed (SystemExit: 3)")
    assert leftovers(tmp_path, set()) == set()


# -- 4. checkpoint integrity -------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    model = helpers.bn_net()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))
    return model.state_dict()


def rezip_with_member(source: Path, target: Path, member_end: str, content: bytes) -> None:
    """A zip checkpoint whose member ``*member_end`` is replaced by ``content`` with a valid CRC."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, content if info.filename.endswith(member_end) else old.read(info.filename))


@pytest.mark.parametrize("member_end, content", [
    ("data.pkl", b"\x80\x02}q\x00(X\x01"), ("data.pkl", b"\x80\x02\xff\xfe\xfd"), ("data.pkl", b"garbage"),
    ("data/0", b"\x00"), ("version", b"\xff\xfe"), ("data.pkl", b"\x80\x02X\x02\x00\x00\x00\xff\xfe."),
], ids=["pickle cut", "bad opcodes", "not a pickle", "tensor data too short", "bad version", "bad utf-8"])
def test_corrupted_archive_members_are_one_line_errors(tmp_path, weights, member_end, content):
    torch.save(weights, tmp_path / "good.pt")
    rezip_with_member(tmp_path / "good.pt", tmp_path / "bad.pt", member_end, content)
    with pytest.raises(CheckpointError) as caught:
        load_model(tmp_path / "bad.pt", f"{H}:bn_net")
    assert "\n" not in str(caught.value) and "corrupted" in str(caught.value)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_legacy_truncations_are_one_line_errors_on_the_cli(tmp_path, weights, fraction):
    torch.save(weights, tmp_path / "full.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: max(1, int(len(data) * fraction))])
    result = runner.invoke(app, ["analyze", str(tmp_path / "cut.pt"), "--model", f"{H}:bn_net", *QUICK, "--out", str(tmp_path / "o")])
    one_error(result, 1, "normscope: error: ")
    assert leftovers(tmp_path, {"full.pt", "cut.pt"}) == set()


def test_a_flipped_bit_in_a_zip_checkpoint_is_detected(tmp_path, weights):
    torch.save(weights, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray((tmp_path / "good.pt").read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 1] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model(tmp_path / "flipped.pt", f"{H}:bn_net")


def test_complex_weights_for_a_real_model_are_refused(tmp_path, weights):
    torch.save({**weights, "1.weight": weights["1.weight"].to(torch.complex64)}, tmp_path / "c.pt")
    result = runner.invoke(app, ["analyze", str(tmp_path / "c.pt"), "--model", f"{H}:bn_net", *QUICK, "--out", str(tmp_path / "o")])
    one_error(result, 1, "complex values for real tensors: 1.weight")


def test_other_dtype_casts_are_stated_in_one_warning_line(tmp_path, weights):
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in weights.items()}, tmp_path / "d.pt")
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(tmp_path / "d.pt"), "--model", f"{H}:bn_net", *QUICK, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert stderr_lines(result) == [f"normscope: warning: weights in {tmp_path / 'd.pt'} were cast from torch.float64 to torch.float32 to fit Sequential"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", ""])
def test_wrapper_prefixes_are_stripped_only_when_that_fits(tmp_path, prefix):
    model = helpers.nested_module_net()
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", f"{H}:nested_module_net")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_missing_num_batches_tracked_is_tolerated(tmp_path, weights):
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt", f"{H}:bn_net")
    assert torch.equal(loaded.state_dict()["2.running_mean"], weights["2.running_mean"])


# -- 5. output ---------------------------------------------------------------------------------

def test_a_concurrent_run_that_finished_first_keeps_its_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("NORMSCOPE_RACE", str(out))
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", "--data", f"{H}:racing_loader", *QUICK, "--out", str(out)])
    one_error(result, 1, "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["summary.json"] and (out / "summary.json").read_text() == "{}\n"
    assert leftovers(tmp_path, {"out"}) == set()


def test_the_final_rename_refuses_an_output_created_meanwhile(tmp_path):
    out = tmp_path / "out"

    def write(staging: Path) -> None:
        (staging / "summary.json").write_text("mine\n")
        out.mkdir()
        (out / "summary.json").write_text("theirs\n")

    with pytest.raises(OutputError, match="was created by someone else while this run was writing"):
        write_folder_atomic(out, write)
    assert (out / "summary.json").read_text() == "theirs\n" and leftovers(tmp_path, {"out"}) == set()


def test_stale_staging_folders_are_swept_only_when_they_are_normscope_s(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.split()[0]
    stale, foreign = tmp_path / ".old.abc.partial", tmp_path / ".mine.xyz.partial"
    stale.mkdir(), foreign.mkdir()
    (stale / MARKER).write_text(f"{os.uname().nodename} {dead}\n")
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and stderr_lines(result) == []
    assert leftovers(tmp_path, {"out", ".mine.xyz.partial"}) == set()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_modes_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
        assert stat.S_IMODE((tmp_path / "out" / "summary.json").stat().st_mode) == 0o666 & ~mask
        rebuilt = runner.invoke(app, ["report", str(tmp_path / "out")])
    finally:
        os.umask(previous)
    assert rebuilt.exit_code == 0 and stat.S_IMODE((tmp_path / "out" / "report.html").stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("name", [".", "..", "x" * 300])
def test_unusable_out_paths_are_one_line(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", name])
    one_error(result, 1, "normscope: error: ")
    assert leftovers(tmp_path, set()) == set()


def test_overwrite_leaves_no_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(out), "--overwrite"])
    assert result.exit_code == 0 and stderr_lines(result) == []
    assert leftovers(tmp_path, {"out"}) == set() and not (out / "mine.txt").exists()


def test_an_interrupt_after_the_rename_says_the_output_is_complete(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("normscope.cli.analyze.print_summary", interrupt)
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(out)])
    assert result.exit_code == 130 and stderr_lines(result) == [f"normscope: interrupted; the output is complete in {out}"]
    assert (out / "summary.json").exists() and leftovers(tmp_path, {"out"}) == set()


@contextlib.contextmanager
def small_file_limit():
    """Writes past 16 KiB fail with EFBIG, as on a full disk, inside the block only (pytest's own
    output file must stay writable, so the limit never spans a test report)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with small_file_limit():
        result = runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(out)])
    one_error(result, 1, "nothing was written")
    assert leftovers(tmp_path, set()) == set()


def test_report_on_a_full_disk_is_one_line_and_keeps_the_old_page(tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(app, ["analyze", "--model", f"{H}:bn_net", *QUICK, "--out", str(out)]).exit_code == 0
    page = (out / "report.html").read_bytes()
    with small_file_limit():
        result = runner.invoke(app, ["report", str(out)])
    one_error(result, 1, "nothing was changed")
    assert (out / "report.html").read_bytes() == page and leftovers(out, {"report.html", "summary.json", "tables"}) == set()


# -- 6. usage errors ---------------------------------------------------------------------------

USAGE = [
    (["analyze", "--batch-size", "x"], "Invalid value for '--batch-size'"),
    (["analyze", "--batches", "0"], "Invalid value for '--batches'"),
    (["analyze", "--lr", "fast"], "Invalid value for '--lr'"),
    (["analyze", "--seed", "1.5"], "Invalid value for '--seed'"),
    (["analyze", "--nope"], "No such option: --nope"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["report"], "Missing argument"),
    (["compare", "--epochs", "-1"], "Invalid value for '--epochs'"),
    (["sites", "--model"], "requires an argument"),
]


@pytest.mark.parametrize("arguments, words", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line_exit_2(tmp_path, monkeypatch, arguments, words):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, arguments)
    one_error(result, 2, words)
    assert stderr_lines(result)[0].startswith("normscope: usage error: ") and result.stdout == ""
    assert leftovers(tmp_path, set()) == set()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"normscope {normscope.__version__}\n"


# -- 7. stray warnings -------------------------------------------------------------------------

def test_library_warnings_do_not_reach_the_terminal(tmp_path):
    result = runner.invoke(app, ["analyze", "--model", f"{H}:warning_net", *QUICK, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert stderr_lines(result) == [] and "Warning" not in result.output


# -- real subprocesses: signals, start-up, the working directory ------------------------------

def spawn(*arguments: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    entry = "from normscope.cli.entry import main; main()"
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-P", "-c", entry, *arguments], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signals_during_the_analysis_leave_nothing(tmp_path, signum, code, word):
    ready, out = tmp_path / "ready", tmp_path / "out"
    process = spawn("analyze", "--model", f"{H}:bn_net", "--data", f"{H}:slow_loader", "--batches", "50", "--out", str(out),
                    cwd=tmp_path, env={"NORMSCOPE_READY": str(ready)})
    wait_for(ready, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if not PROGRESS.search(line)]
    assert process.returncode == code and lines == [f"normscope: {word}; nothing was written"], stderr
    assert leftovers(tmp_path, {"ready"}) == set()


def test_sigterm_while_staging_removes_the_staging_folder(tmp_path):
    script = (
        "import sys, time; from pathlib import Path\n"
        "from normscope.cli.boundary import install_signal_handlers, Terminated\n"
        "from normscope.output import write_folder_atomic\n"
        "install_signal_handlers()\n"
        "def write(staging):\n    (staging / 'half.csv').write_text('1'); Path(sys.argv[1]).touch(); time.sleep(60)\n"
        "try:\n    write_folder_atomic(Path(sys.argv[2]), write)\nexcept Terminated:\n    sys.exit(143)\n"
    )
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", script, str(ready), str(tmp_path / "out")], cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    wait_for(ready, process)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 143 and leftovers(tmp_path, {"ready"}) == set()


def loads_a_native_library(process: subprocess.Popen, seconds: float = 60) -> None:
    """Wait until the process maps NumPy's or torch's native code, i.e. is inside the start-up imports."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + seconds
    while not maps.exists() or not re.search(r"_multiarray_umath|libtorch|libc10", maps.read_text()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
def test_sigint_during_start_up_imports_is_one_line_130(tmp_path, delay):
    process = spawn("analyze", "--out", str(tmp_path / "out"), cwd=tmp_path)
    if Path("/proc/self/maps").exists():
        loads_a_native_library(process)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.splitlines() == ["normscope: interrupted; nothing was written"], stderr
    assert leftovers(tmp_path, set()) == set()


def test_a_jinja2_module_in_the_working_directory_does_not_run(tmp_path):
    (tmp_path / "jinja2.py").write_text("import pathlib\npathlib.Path('HACKED').touch()\nraise SystemExit('ran jinja2.py')\n")
    (tmp_path / "corpus_cwd_model.py").write_text("from tests.robustness_helpers import bn_net\n")
    process = spawn("analyze", "--model", "corpus_cwd_model:bn_net", *QUICK, "--out", str(tmp_path / "out"), cwd=tmp_path)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and not [line for line in stderr.splitlines() if not PROGRESS.search(line)], stderr
    assert not (tmp_path / "HACKED").exists() and (tmp_path / "out" / "report.html").exists()
    assert leftovers(tmp_path, {"jinja2.py", "corpus_cwd_model.py", "out", "__pycache__"}) == set()
