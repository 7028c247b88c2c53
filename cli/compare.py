"""``normscope compare [CHECKPOINT]``: train normalization ops side by side and write the curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import pandas as pd
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from normscope.api import progress_bars
from normscope.checkpoint import import_attribute, load_model
from normscope.cli.analyze import default_out, load_data, resolve_device
from normscope.cli.boundary import boundary
from normscope.cli.options import flag, option
from normscope.compare import DEFAULT_OPS, Data, compare as run_compare, default_data, parse_variants
from normscope.errors import DataShapeError, InvalidArgumentError, UnknownNameError
from normscope.models import MODELS
from normscope.ops.factory import norm_names
from normscope.result import TABLES_DIR, refuse_nonempty, write_folder_atomic, write_tables

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
OPS_HELP = (
    f"Comma-separated variants: ops from {', '.join(norm_names())}, rmsnorm (LayerNorm sites), two_stage "
    "(PopulationNorm trained by two-stage backprop), model (unchanged); options follow a colon, "
    "e.g. 'bn,population:ema=0.2'; an op's options (microbatch, rotation, r_m, r_v, ema, warmup, label) "
    "run on until the next op name."
)


def compare(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(help="A .pt/.pth/.safetensors file with the starting weights; omit it to start from a fresh built-in model.", show_default=False),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=f"Built-in model ({', '.join(MODELS)}) or package.module:factory.")] = "mlp_bn",
    ops: Annotated[str, typer.Option("--ops", help=OPS_HELP)] = ",".join(DEFAULT_OPS),
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Comma-separated minibatch sizes (each >= 2).")] = "2,32",
    epochs: Annotated[float, typer.Option("--epochs", min=0.0, help="Budget in passes over the training data (equal examples per variant), unless --steps or --examples.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Budget in weight updates, the same for every variant and batch size (0: use the examples budget).")] = 0,
    examples: Annotated[int, typer.Option("--examples", min=0, help="Budget in examples seen per run (0: --epochs passes).")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate at batch size 32 (scaled linearly with the batch size).")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="First seed of the initial weights and the batch order.")] = 0,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per variant (seed, seed+1, ...): mean ± std, and a winner only beyond the spread.")] = 1,
    data: Annotated[str, typer.Option("--data", help="'digits', 'digits-flat' (N, 64), or package.module:loader as for analyze (the last 20% of its examples are the test split; or it returns train_x, train_y, test_x, test_y).")] = "digits",
    loss: Annotated[str, typer.Option("--loss", help="'cross_entropy', 'mse' or pkg.module:function, called as fn(outputs, targets).")] = "cross_entropy",
    analyzers: Annotated[str, typer.Option("--analyzers", help="Analyze each variant's trained model with these analyzers (e.g. 'stats,gls,descent'): lambda_max, a_crit, drift and R² per variant and seed in OUT/tables/compare_analysis.")] = "",
    out: Annotated[Optional[Path], option("--out", "-o", help="Output folder.", default_text="normscope-out/<UTC time>")] = None,
    device: Annotated[str, typer.Option("--device", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")] = "auto",
    trust: Annotated[bool, flag("--trust", "Allow loading a whole pickled model (runs code from the file).")] = False,
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing non-empty output folder.")] = False,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """Train each normalization variant in place of the model's norm layers on the same data, seeds and
    budget, at each batch size, and write curves, per-run and per-variant tables (OUT/tables/compare_*)."""
    with boundary(debug) as outcome:
        variants = parse_variants(ops)
        sizes = parse_batch_sizes(batch_size)
        out = default_out() if out is None else out
        refuse_nonempty(out, overwrite)
        target = resolve_device(device)
        loss_fn = resolve_loss(loss)
        start = model.strip().lower() if checkpoint is None and model.strip().lower() in MODELS else load_model(checkpoint, model, trust=trust)
        splits = resolve_data(data, max(sizes))
        from normscope.api import analyzer_names

        chosen = analyzer_names(analyzers) if analyzers.strip() else None
        with progress_bars(True) as track:
            result = run_compare(
                start, variants, sizes, epochs=epochs, steps=steps or None, examples=examples or None, lr=lr, seed=seed,
                seeds=seeds, data=splits, loss_fn=loss_fn, device=target, track=track, analyzers=chosen,
            )
        write_folder_atomic(out, lambda staging: write_tables(staging / TABLES_DIR, result.tables), overwrite=overwrite)
        outcome.written = out
        print_summary(result.tables["compare_stats"], result.findings)
        typer.echo(str(out))


def resolve_loss(spec: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A preset of :data:`LOSSES` or ``package.module:function``."""
    key = spec.strip().lower().replace("-", "_")
    if key in LOSSES:
        return LOSSES[key]
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UnknownNameError("--loss", spec, [*LOSSES, "package.module:function"])
    found = import_attribute(module_name, attribute, spec, "--loss")
    if not callable(found):
        raise InvalidArgumentError(f"--loss {spec} is a {type(found).__name__}, not a function")
    return found


def resolve_data(spec: str, batch_size: int) -> Data | None:
    """``digits`` (the API's default, None), ``digits-flat``, or what :func:`normscope.cli.analyze.load_data`
    reads, as train and test tensors: a 4-tuple as given, else its examples in order with the last
    20% as the test split."""
    key = spec.strip().lower()
    if key in ("digits-flat", "digits_flat"):
        return default_data(torch.device("cpu"), torch.float32, flat=True)
    if key == "digits" or ":" not in spec:
        return load_data(spec, batch_size)
    module_name, _, attribute = spec.partition(":")
    found: Any = import_attribute(module_name, attribute, spec, "--data")
    if callable(found) and not isinstance(found, DataLoader):
        found = found()
    if isinstance(found, (tuple, list)) and len(found) == 4 and all(isinstance(t, torch.Tensor) for t in found):
        return tuple(found)
    if isinstance(found, DataLoader):
        pairs = list(found)
        if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise DataShapeError(f"--data {spec}: compare needs batches of (inputs, targets) tensors")
        inputs, targets = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    elif isinstance(found, (tuple, list)) and len(found) == 2:
        inputs, targets = found
    else:
        raise DataShapeError(f"--data {spec} gave a {type(found).__name__}; compare needs a DataLoader, (inputs, targets) or (train_x, train_y, test_x, test_y)")
    cut = int(math.ceil(0.8 * len(inputs)))
    if cut >= len(inputs):
        raise DataShapeError(f"--data {spec} has {len(inputs)} examples, too few for a train and a test split")
    return inputs[:cut], targets[:cut], inputs[cut:], targets[cut:]


def parse_batch_sizes(text: str) -> list[int]:
    """Comma-separated integers >= 2."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise InvalidArgumentError(f"--batch-size needs comma-separated integers >= 2 (got {text!r})")
    return sizes


def print_summary(stats: pd.DataFrame, findings: list[str]) -> None:
    """The per-variant table (mean ± std over seeds) and the findings on stdout."""
    table = Table(title="normscope compare")
    for column in ("op", "batch size", "seeds", "steps", "examples", "test accuracy", "test loss", "vs baseline", "status", "s/step"):
        table.add_column(column, justify="left" if column in ("op", "status", "vs baseline") else "right")
    for row in stats.itertuples():
        spread = "" if math.isnan(row.test_accuracy_std) else f" ± {row.test_accuracy_std:.3f}"
        loss_spread = "" if math.isnan(row.test_loss_std) else f" ± {row.test_loss_std:.3f}"
        table.add_row(
            row.op, str(row.batch_size), str(row.seeds), str(row.steps), str(row.examples),
            f"{row.test_accuracy_mean:.3f}{spread}", f"{row.test_loss_mean:.3f}{loss_spread}", row.verdict,
            row.status, f"{row.seconds_per_step * 1e3:.2f} ms",
        )
    console = Console()
    console.print(table)
    if "lambda_max_train_mean" in stats:
        analysis = Table(title="trained variants analyzed in place (means over seeds; compare_analysis has each seed)")
        for column in ("op", "batch size", "λ_max (train)", "a_crit (train)", "mean drift max", "GLS R² mean", "backward vs residual"):
            analysis.add_column(column, justify="left" if column == "op" else "right")
        for row in stats.itertuples():
            cells = [row.lambda_max_train_mean, row.a_crit_train_mean, row.mean_drift_max_mean, row.gls_r2_mean_mean, row.gls_identity_rel_max_mean]
            analysis.add_row(row.op, str(row.batch_size), *("–" if math.isnan(v) else f"{v:.3g}" for v in cells))
        console.print(analysis)
    for sentence in findings:
        console.print(sentence, markup=False)
