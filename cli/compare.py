"""``normscope compare [CHECKPOINT]``: train normalization ops side by side and write the curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from normscope.api import progress_bars
from normscope.checkpoint import load_model
from normscope.cli.analyze import default_out, resolve_device
from normscope.cli.boundary import boundary
from normscope.cli.options import flag, option
from normscope.compare import DEFAULT_OPS, compare as run_compare
from normscope.errors import InvalidArgumentError
from normscope.models import MODELS
from normscope.ops.factory import get_norm, norm_names
from normscope.result import TABLES_DIR, refuse_nonempty, write_folder_atomic, write_tables


def compare(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(help="A .pt/.pth/.safetensors file with the starting weights; omit it to start from a fresh built-in model.", show_default=False),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=f"Built-in model ({', '.join(MODELS)}) or package.module:factory.")] = "mlp_bn",
    ops: Annotated[str, typer.Option("--ops", help=f"Comma-separated ops from: {', '.join(norm_names())}.")] = ",".join(DEFAULT_OPS),
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Comma-separated minibatch sizes (each >= 2).")] = "2,32",
    epochs: Annotated[float, typer.Option("--epochs", min=0.0, help="Passes over the training data per run.")] = 1.0,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Cap on the SGD steps per run (0: no cap).")] = 300,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate at batch size 32 (scaled linearly with the batch size).")] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial weights and the batch order.")] = 0,
    out: Annotated[Optional[Path], option("--out", "-o", help="Output folder.", default_text="normscope-out/<UTC time>")] = None,
    device: Annotated[str, typer.Option("--device", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'.")] = "auto",
    trust: Annotated[bool, flag("--trust", "Allow loading a whole pickled model (runs code from the file).")] = False,
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing non-empty output folder.")] = False,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """Train each normalization op in place of the model's BatchNorms on the same data and seed,
    at each batch size, and write loss/accuracy curves and a summary table (OUT/tables/compare_*)."""
    with boundary(debug):
        op_list = parse_ops(ops)
        sizes = parse_batch_sizes(batch_size)
        out = default_out() if out is None else out
        refuse_nonempty(out, overwrite)
        target = resolve_device(device)
        start = model.strip().lower() if checkpoint is None and model.strip().lower() in MODELS else load_model(checkpoint, model, trust=trust)
        with progress_bars(True) as track:
            result = run_compare(
                start, op_list, sizes, epochs=epochs, steps=steps or None, lr=lr, seed=seed, device=target, track=track
            )
        write_folder_atomic(out, lambda staging: write_tables(staging / TABLES_DIR, result.tables))
    print_summary(result.tables["compare_summary"], result.findings)
    typer.echo(str(out))


def parse_ops(text: str) -> list[str]:
    """Comma-separated op names, each checked against the factory (an unknown one lists the valid names)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InvalidArgumentError(f"--ops needs at least one op from {', '.join(norm_names())} (got {text!r})")
    for name in names:
        get_norm(name)
    return names


def parse_batch_sizes(text: str) -> list[int]:
    """Comma-separated integers >= 2."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise InvalidArgumentError(f"--batch-size needs comma-separated integers >= 2 (got {text!r})")
    return sizes


def print_summary(summary: pd.DataFrame, findings: list[str]) -> None:
    """The summary table and the findings on stdout."""
    table = Table(title="normscope compare")
    for column in ("op", "batch size", "steps", "train loss", "test loss", "test accuracy", "seconds"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for row in summary.itertuples():
        table.add_row(
            row.op, str(row.batch_size), str(row.steps), f"{row.final_train_loss:.4f}", f"{row.final_test_loss:.4f}",
            f"{row.final_test_accuracy:.3f}", f"{row.seconds:.1f}",
        )
    console = Console()
    console.print(table)
    for sentence in findings:
        console.print(sentence)
