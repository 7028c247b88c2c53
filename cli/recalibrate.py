"""``normscope recalibrate CHECKPOINT --out fixed.pt``: a copy with population running statistics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from normscope.api import make_loader, user_batches
from normscope.checkpoint import first_line, load_model
from normscope.cli.analyze import load_data
from normscope.cli.boundary import boundary, printable
from normscope.cli.options import flag, option
from normscope.errors import InvalidArgumentError, OutputError
from normscope.findings import number, percent
from normscope.models import MODELS
from normscope.recalibration import evaluate, recalibrate as recalibrated_copy, running_stat_layers
from normscope.safe_io import describe, write_file


def recalibrate(
    checkpoint: Annotated[Path, typer.Argument(help="A .pt/.pth/.safetensors file; it is read, never written.", show_default=False)],
    out: Annotated[Path, option("--out", "-o", help="Where to write the recalibrated state dict (.pt).", default_text=False)],
    model: Annotated[
        Optional[str], option("--model", "-m", help=f"Built-in model ({', '.join(MODELS)}) or package.module:factory, for a state dict.",
                              default_text=False)
    ] = None,
    data: Annotated[str, option("--data", help="Data whose population moments to use: 'digits' or package.module:loader.")] = "digits",
    batch_size: Annotated[int, option("--batch-size", min=1, help="Examples per forward pass.")] = 256,
    trust: Annotated[bool, flag("--trust", "Allow loading a whole pickled model (runs code from the file).")] = False,
    overwrite: Annotated[bool, flag("--overwrite", "Replace an existing --out file.")] = False,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """Write a copy of CHECKPOINT whose BatchNorm running statistics are the population moments of
    --data (the original is left untouched), and print eval loss and accuracy before and after."""
    with boundary(debug):
        if out.is_dir() and not out.is_symlink():
            raise OutputError(f"--out {out} is a folder; pass a file path such as {out / 'recalibrated.pt'}")
        if os.path.lexists(out) and not overwrite:
            raise OutputError(f"{out} already exists; choose another --out or pass --overwrite")
        if out.resolve() == checkpoint.resolve():
            raise InvalidArgumentError("--out must differ from CHECKPOINT: the original is never overwritten")
        net = load_model(checkpoint, model, trust=trust)
        if not running_stat_layers(net):
            raise InvalidArgumentError(f"{type(net).__name__} has no layer with running statistics (BatchNorm); there is nothing to recalibrate")
        loader, _, source = make_loader(load_data(data, batch_size), batch_size, 0)
        batches = [(b[0], b[1]) for b in user_batches(loader)]
        fixed = recalibrated_copy(net, batches)
        before, after = evaluate(net, batches), evaluate(fixed, batches)
        write_state_dict(fixed.state_dict(), out)
    table = Table(title=printable(f"normscope recalibrate · {checkpoint.name} on {source} ({before['examples']} examples, eval mode)"))
    for column in ("running statistics", "loss", "accuracy"):
        table.add_column(column, justify="left" if column == "running statistics" else "right")
    table.add_row("before (as saved)", number(before["loss"], 4), percent(before["accuracy"]))
    table.add_row("after (population moments)", number(after["loss"], 4), percent(after["accuracy"]))
    Console().print(table)
    typer.echo(printable(str(out)))


def write_state_dict(state: dict[str, torch.Tensor], out: Path) -> None:
    """``torch.save(state)`` to ``out`` through :func:`normscope.safe_io.write_file` (a new file
    renamed into place: never half-written, never written through a link)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create {out.parent} ({describe(error)}); choose another --out") from error
    try:
        write_file(out, lambda stream: torch.save(state, stream))
    except RuntimeError as error:  # torch.save reports a failed write (a full disk) as RuntimeError
        raise OutputError(f"cannot write {out} ({first_line(error)}); nothing was changed") from error
