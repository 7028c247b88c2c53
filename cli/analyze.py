"""``normscope analyze [CHECKPOINT]``: run the analyzers and write tables, summary and report."""

from __future__ import annotations

import inspect
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from torch.utils.data import DataLoader

from normscope.api import DEVICE_TYPES, SEED_RANGE, Data, analyzer_names
from normscope.api import analyze as run_analysis
from normscope.budget import DEFAULT_BUDGET
from normscope.checkpoint import call_user, import_attribute, load_model
from normscope.distributed import launch_rank
from normscope.data import DIGITS
from normscope.cli.boundary import boundary, check_launch_environment, printable, warn
from normscope.cli.options import flag, option
from normscope.cli.summary import print_summary
from normscope.errors import DataShapeError, UnknownNameError
from normscope.models import DEFAULT_MODEL, MODELS
from normscope.overview import attach as attach_overview
from normscope.result import refuse_nonempty
from normscope.rules import advise, recalibrate_hint
from normscope.train import train_reference

DEFAULT_OUT_ROOT = Path("normscope-out")
TRAIN_LR = inspect.signature(train_reference).parameters["lr"].default
LOSS_HELP = (
    "cross_entropy, mse, lm (next-token), model (the model's own .loss from the batch's labels), or a function "
    "pkg.module:function called as fn(outputs, targets)."
)
LOSS_DEFAULT = "cross_entropy with targets, lm for token ids"


def analyze(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(help="A .pt/.pth/.safetensors file; omit it to analyze the built-in default trained on digits.", show_default=False),
    ] = None,
    out: Annotated[Optional[Path], option("--out", "-o", help="Output folder.", default_text="normscope-out/<UTC time>")] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help=f"Built-in model ({', '.join(MODELS)}) or a factory, package.module:fn.", show_default=False),
    ] = None,
    trust: Annotated[bool, flag("--trust", "Allow loading a whole pickled model (runs code from the file).")] = False,
    analyzers: Annotated[
        Optional[str], option("--analyzers", "-a", help="Comma-separated names: stats, gls, bias, descent, dead.", default_text="all")
    ] = None,
    data: Annotated[
        str, typer.Option("--data", help="'digits' (N, 1, 8, 8), 'digits-flat' (N, 64; chosen by itself for a first Linear of 64 features) or package.module:loader.")
    ] = "digits",
    loss: Annotated[Optional[str], option("--loss", help=LOSS_HELP, default_text=LOSS_DEFAULT)] = None,
    random_layers: Annotated[
        str, typer.Option("--random-layers", help="Dropout during the analyses: off, fixed (on, fixed masks) or on.")
    ] = "off",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Minibatch size.")] = 128,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Minibatches for the per-step analyses.")] = 4,
    device: Annotated[str, typer.Option("--device", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=SEED_RANGE[0], max=SEED_RANGE[1], help="Seed of the batch order and of every random choice.")] = 0,
    lr: Annotated[
        Optional[float], option("--lr", help="Learning rate to check step sizes against.", default_text="the built-in's training lr")
    ] = None,
    budget: Annotated[
        float, typer.Option("--budget", min=0, help="Seconds the analyzers may spend in all; work is planned and cut to fit (0: no limit).")
    ] = DEFAULT_BUDGET,
    quick: Annotated[bool, typer.Option("--quick/--full", help="The analyzers' small default settings, or their full settings (within --budget).", metavar="")] = True,
    sites: Annotated[
        Optional[str], option("--sites", help="fnmatch pattern on site and module names restricting the work, e.g. '*bn*'.", default_text="all")
    ] = None,
    precision: Annotated[
        str, typer.Option("--precision", help="Descent's Hessian-vector products: 'model' (the model's dtype, checked against float64) or 'float64'.")
    ] = "model",
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing non-empty output folder.")] = False,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """Analyze every normalization site of a model and write tables, summary.json and report.html.

    Under ``torchrun`` every rank runs the analysis (README "Data beyond one process"); only rank 0
    writes the output folder and prints, the other ranks end quietly with exit code 0."""
    with boundary(debug) as outcome:
        check_launch_environment()
        writer = launch_rank() == 0
        console = Console(stderr=True, quiet=not writer)
        names = None if analyzers is None else analyzer_names(analyzers)
        target = resolve_device(device)
        out = default_out() if out is None else out
        if writer:
            refuse_nonempty(out, overwrite)
        builtin = checkpoint is None and (model is None or ":" not in model)
        started = time.perf_counter()
        with console.status("training the built-in default on digits" if builtin else "loading the model"):
            net = load_model(checkpoint, model, trust=trust)
        loading = time.perf_counter() - started
        loaded = load_data(data, batch_size)
        result = run_analysis(
            net,
            data=loaded,
            analyzers=names,
            batch_size=batch_size,
            batches=batches,
            device=target,
            seed=seed,
            loss_fn=loss,
            random_layers=random_layers,
            lr=TRAIN_LR if lr is None and builtin else lr,
            progress=writer,
            budget=budget,
            quick=quick,
            sites=sites,
            precision=precision,
        )
        result.meta["model"].update(
            name=model_name(checkpoint, model),
            checkpoint=None if checkpoint is None else str(checkpoint),
            spec=model or (DEFAULT_MODEL if checkpoint is None else None),
        )
        result.meta["data"]["spec"] = data
        result.findings = advise(result.findings, recalibrate_hint(None if checkpoint is None else str(checkpoint), model, data))
        attach_overview(result)
        result.meta["seconds"]["load_model"] = loading
        if not writer:
            return
        with console.status("writing tables and report"):
            result.save(out, overwrite=overwrite)
        outcome.written = out
        print_summary(result, out, Console(), elapsed=time.perf_counter() - started)
        for message in result.meta["analyzer_errors"].values():
            warn(message)
        typer.echo(printable(str(out)))
        if "interrupted" in result.meta["analyzer_errors"]:
            raise typer.Exit(130)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; other names must parse, be a CPU or CUDA device
    (not meta, XLA or MPS) and be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UnknownNameError("device", device, valid) from None
    if parsed.type not in DEVICE_TYPES:
        raise UnknownNameError("device (normscope runs on CPU or CUDA)", device, valid)
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise UnknownNameError("device (no such CUDA device here)", device, valid)
    return parsed


def default_out() -> Path:
    """``normscope-out/<UTC time>``, with a suffix if that folder exists already."""
    stem = DEFAULT_OUT_ROOT / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate, number = stem, 1
    while candidate.exists():
        candidate, number = stem.with_name(f"{stem.name}-{number}"), number + 1
    return candidate


def load_data(spec: str, batch_size: int) -> Data:
    """``digits`` is ``None`` (the API's default: the digits, flat for a model whose first layer
    is a Linear of 64 features), ``digits-flat`` the (N, 64) digits; ``package.module:loader``
    names a DataLoader, a whole batch (tuple or dict of tensors), or a function returning one
    (given ``batch_size`` if it takes it)."""
    if spec.strip().lower() == "digits":
        return None
    if spec.strip().lower() in DIGITS:
        return spec.strip().lower()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UnknownNameError("--data", spec, [*DIGITS, "package.module:loader"])
    found = import_attribute(module_name, attribute, spec, "--data")
    if callable(found) and not isinstance(found, DataLoader):
        takes_batch_size = "batch_size" in inspect.signature(found).parameters
        found = call_user(found, spec, "--data", **({"batch_size": batch_size} if takes_batch_size else {}))
    if isinstance(found, (DataLoader, tuple, list, dict)):
        return found
    raise DataShapeError(
        f"--data {spec} gave a {type(found).__name__}; it must give a DataLoader, an (inputs, targets) tuple or a dict of tensors"
    )


def model_name(checkpoint: Path | None, model: str | None) -> str:
    """How the report and the summary name the model."""
    if checkpoint is None:
        return f"{model or DEFAULT_MODEL} (trained on digits)" if model is None or ":" not in model else model
    return f"{checkpoint.name} ({model})" if model else checkpoint.name
