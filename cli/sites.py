"""``normscope sites [CHECKPOINT]``: list the normalization sites a model has, and their kinds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from normscope.analyzers import no_progress
from normscope.api import check_fit, floating_dtype, make_loader, model_device, site_row, take_batches
from normscope.capture import find_sites, find_unrecognized
from normscope.checkpoint import build_from_spec, load_model
from normscope.cli.analyze import load_data
from normscope.cli.boundary import boundary
from normscope.cli.options import flag
from normscope.errors import DataShapeError, NoNormSitesError
from normscope.findings import plural
from normscope.models import DEFAULT_MODEL, MODELS


def sites(
    checkpoint: Annotated[
        Optional[Path], typer.Argument(help="A .pt/.pth/.safetensors file; omit it to list the sites of --model.", show_default=False)
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help=f"Built-in model ({', '.join(MODELS)}) or package.module:factory.", show_default=False),
    ] = None,
    trust: Annotated[bool, flag("--trust", "Allow loading a whole pickled model (runs code from the file).")] = False,
    data: Annotated[str, typer.Option("--data", help="Data for one forward pass that finds functional calls: 'digits' or package.module:loader.")] = "digits",
    json_output: Annotated[bool, flag("--json", "Print the sites as JSON (full names, kinds, module types) instead of a table.")] = False,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """List the normalization sites (modules and functional calls), their kinds, and unrecognized norm-like modules."""
    console = Console()
    with boundary(debug):
        net = build_from_spec(model or DEFAULT_MODEL) if checkpoint is None else load_model(checkpoint, model, trust=trust)
        unrecognized = find_unrecognized(net)
        try:
            loader, _, _ = make_loader(load_data(data, 2), 2, 0)
            batch = take_batches(loader, 1, model_device(net), floating_dtype(net), no_progress)[0]
            found, _ = check_fit(net, batch, ignore_loss)
            note = "found by one forward pass on --data (modules and functional calls)"
        except (DataShapeError, NoNormSitesError) as error:
            found = find_sites(net)
            note = f"modules only: functional calls need a forward pass, which failed ({error})"
    if json_output:
        typer.echo(json.dumps({"model": type(net).__name__, "note": note, "sites": [site_row(site) for site in found],
                               "unrecognized": [{"name": p, "module_type": c} for p, c in unrecognized]}, indent=2))
        return
    longest = max((len(s.name) for s in found), default=0)
    if not console.is_terminal:
        console = Console(width=max(console.width, longest + 50))
    table = Table(title=f"{plural(len(found), 'normalization site')} of {type(net).__name__}", caption=note)
    for column in ("site", "kind", "module type", "functional"):
        table.add_column(column, overflow="fold", no_wrap=False, min_width=len(max((s.name for s in found), key=len, default="")) if column == "site" else None)
    for site in found:
        table.add_row(site.name, str(getattr(site.kind, "name", site.kind)), site.module_type, "yes" if site.functional else "")
    console.print(table)
    if unrecognized:
        others = Table(title="norm-like modules not recognized (register them with normscope.register_norm)")
        others.add_column("module")
        others.add_column("class")
        for path, cls in unrecognized:
            others.add_row(path, cls)
        console.print(others)


def ignore_loss(outputs: object, targets: object) -> torch.Tensor:
    """Listing sites needs no loss: any model output is accepted."""
    return torch.zeros(())
