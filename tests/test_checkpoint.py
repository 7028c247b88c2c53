"""Checkpoint loading: every accepted form, and every bad input through the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from normscope.checkpoint import load_model, nonfinite_weights
from normscope.cli.app import app
from normscope.errors import (
    CheckpointError,
    DataShapeError,
    ModelImportError,
    NoNormSitesError,
    NormscopeError,
    UnknownNameError,
    UntrustedPickleError,
)
from normscope.models import build_model
from tests.cli_helpers import small_bn_net

runner = CliRunner()


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    """A built-in model with non-trivial running statistics."""
    model = build_model("mlp_bn", seed=3)
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, mlp: torch.nn.Module) -> dict[str, Path]:
    """Checkpoints in every accepted and every broken form."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {name: root / name for name in (
        "state.pt", "whole.pt", "wrapped.pt", "model_state.pt", "prefixed.pth", "weights.safetensors",
        "truncated.pt", "truncated_legacy.pt", "truncated.safetensors", "text.pt", "list.pt", "nan.pt", "user.pt",
    )}
    state = mlp.state_dict()
    torch.save(state, paths["state.pt"])
    torch.save(mlp, paths["whole.pt"])
    torch.save({"state_dict": state, "epoch": 3}, paths["wrapped.pt"])
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}}, paths["model_state.pt"])
    torch.save({f"module.{k}": v for k, v in state.items()}, paths["prefixed.pth"])
    save_file({k: v.contiguous() for k, v in state.items()}, paths["weights.safetensors"])
    data = paths["state.pt"].read_bytes()
    paths["truncated.pt"].write_bytes(data[: len(data) // 2])
    torch.save(state, paths["truncated_legacy.pt"], _use_new_zipfile_serialization=False)
    legacy = paths["truncated_legacy.pt"].read_bytes()
    paths["truncated_legacy.pt"].write_bytes(legacy[: len(legacy) // 2])
    tensors = paths["weights.safetensors"].read_bytes()
    paths["truncated.safetensors"].write_bytes(tensors[: len(tensors) // 2])
    paths["text.pt"].write_text("epoch,loss\n1,0.5\n")
    torch.save([1, 2, 3], paths["list.pt"])
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["net.1.weight"][0, 0] = float("nan")
    nan_state["net.2.running_var"][1] = float("inf")
    torch.save(nan_state, paths["nan.pt"])
    torch.save(small_bn_net().state_dict(), paths["user.pt"])
    return paths


@pytest.mark.parametrize("name", ["state.pt", "wrapped.pt", "model_state.pt", "prefixed.pth", "weights.safetensors"])
def test_state_dict_forms_load_the_exact_weights(files, mlp, name):
    model = load_model(files[name], "mlp_bn")
    for key, value in mlp.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_whole_pickled_module_loads_only_with_trust(files, mlp):
    with pytest.raises(UntrustedPickleError, match="--trust"):
        load_model(files["whole.pt"], None)
    model = load_model(files["whole.pt"], None, trust=True)
    assert type(model) is type(mlp)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), mlp.state_dict().values(), strict=True))


def test_user_factory_spec_builds_the_users_model(tmp_path):
    user = small_bn_net()
    torch.save(user.state_dict(), tmp_path / "user.pt")
    loaded = load_model(tmp_path / "user.pt", "tests.cli_helpers:small_bn_net")
    assert isinstance(loaded, torch.nn.Sequential)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), user.state_dict().values(), strict=True))


def test_nonfinite_weights_are_named_per_module(files):
    messages = nonfinite_weights(load_model(files["nan.pt"], "mlp_bn"))
    assert messages == [
        "non-finite weights in net.1: weight (1 NaN, 0 Inf)",
        "non-finite weights in net.2: running_var (0 NaN, 1 Inf)",
    ]


BAD_INPUTS = [
    # (id, checkpoint file or None, extra arguments, error class, words the message must contain)
    ("missing file", "does-not-exist.pt", ["--model", "mlp_bn"], CheckpointError, "not found"),
    ("not a checkpoint", "text.pt", ["--model", "mlp_bn"], CheckpointError, "not a PyTorch checkpoint"),
    ("not weights", "list.pt", ["--model", "mlp_bn"], CheckpointError, "not a state dict"),
    ("truncated zip", "truncated.pt", ["--model", "mlp_bn"], CheckpointError, "truncated"),
    ("truncated legacy", "truncated_legacy.pt", ["--model", "mlp_bn"], CheckpointError, "truncated"),
    ("truncated safetensors", "truncated.safetensors", ["--model", "mlp_bn"], CheckpointError, "truncated"),
    ("pickle needs trust", "whole.pt", [], UntrustedPickleError, "--trust"),
    ("state dict without model", "state.pt", [], CheckpointError, "--model"),
    ("state dict does not fit", "state.pt", ["--model", "resnet_bn"], CheckpointError, "unexpected keys: net.1.weight"),
    ("state dict wrong shapes", "user.pt", ["--model", "tests.cli_helpers:wide_bn_net"], CheckpointError,
     "wrong shapes: 1.weight (16, 64) vs (32, 64)"),
    ("model not importable", "state.pt", ["--model", "no_such_package.models:build"], ModelImportError, "no_such_package"),
    ("model attribute missing", "state.pt", ["--model", "tests.cli_helpers:nothing"], ModelImportError, "no attribute 'nothing'"),
    ("factory not a model", "state.pt", ["--model", "tests.cli_helpers:not_a_model"], ModelImportError, "not a torch.nn.Module"),
    ("unknown built-in", "state.pt", ["--model", "mlp_nope"], UnknownNameError, "valid names: cnn_gn"),
    ("no normalization sites", None, ["--model", "tests.cli_helpers:no_norm_net"], NoNormSitesError, "no normalization layer"),
    ("data of the wrong shape", "state.pt", ["--model", "mlp_bn", "--data", "tests.cli_helpers:wrong_shape_loader", "--batch-size", "16"],
     DataShapeError, "inputs of shape (16, 3, 5, 5) do not fit MLP"),
]


LOAD_ERRORS = [case for case in BAD_INPUTS if case[3] not in (NoNormSitesError, DataShapeError)]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_line_nonzero_exit_and_no_output(files, tmp_path, case):
    _, name, extra, error, words = case
    arguments = ["analyze"] + ([] if name is None else [str(files[name] if name in files else tmp_path / name)])
    out = tmp_path / "out"
    result = runner.invoke(app, arguments + extra + ["--analyzers", "stats", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normscope: error: "), result.stderr
    assert words in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with_debug = runner.invoke(app, arguments + extra + ["--analyzers", "stats", "--out", str(out), "--debug"])
    assert isinstance(with_debug.exception, error) and words in str(with_debug.exception)
    assert not out.exists()


@pytest.mark.parametrize("case", LOAD_ERRORS, ids=[case[0] for case in LOAD_ERRORS])
def test_bad_checkpoint_raises_the_named_class_from_load_model(files, tmp_path, case):
    _, name, extra, error, words = case
    with pytest.raises(error) as caught:
        load_model(files.get(name, tmp_path / name), extra[1] if extra else None)
    assert isinstance(caught.value, NormscopeError)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_nonfinite_weights_are_reported_per_site_not_a_crash(files, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(files["nan.pt"]), "--model", "mlp_bn", "--analyzers", "stats", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "non-finite weights in net.1" in result.stdout
    from normscope.result import AnalysisResult

    saved = AnalysisResult.load(out)
    assert saved.findings["model"][0].startswith("non-finite weights in net.1")
    assert saved.tables["stats_sites"].set_index("site").loc["net.2", "nonfinite"] > 0


@pytest.mark.parametrize("name, extra", [("whole.pt", ["--trust"]), ("weights.safetensors", ["--model", "mlp_bn"])])
def test_cli_analyzes_a_trusted_pickle_and_a_safetensors_file(files, tmp_path, name, extra):
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(files[name]), *extra, "--analyzers", "stats", "--batches", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    from normscope.result import AnalysisResult

    assert [site["name"] for site in AnalysisResult.load(out).meta["sites"]] == ["net.2", "net.5"]


def test_nonfinite_activations_are_reported_per_site_not_a_crash(files, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(files["state.pt"]), "--model", "mlp_bn", "--data", "tests.cli_helpers:nan_pixel_loader",
                                 "--analyzers", "stats", "--batches", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from normscope.result import AnalysisResult

    sites = AnalysisResult.load(out).tables["stats_sites"].set_index("site")
    assert (sites["nonfinite"] > 0).all()
