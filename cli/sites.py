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
from normscope.cli.analyze import LOSS_HELP, load_data
from normscope.cli.boundary import boundary
from normscope.cli.options import flag
from normscope.data import digits_form
from normscope.errors import DataShapeError, NoNormSitesError
from normscope.findings import plural
from normscope.losses import resolve as resolve_loss
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
    data: Annotated[
        str, typer.Option("--data", help="Data for one forward pass that finds functional calls: 'digits', 'digits-flat' or package.module:loader.")
    ] = "digits",
    loss: Annotated[Optional[str], typer.Option("--loss", help=LOSS_HELP, show_default=False)] = None,
    json_output: Annotated[bool, flag("--json", "Print the sites as JSON (full names, kinds, module types) instead of a table.")] = False,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """List the normalization sites (modules and functional calls), their kinds, unrecognized norm-like modules and unverified sites."""
    console = Console()
    with boundary(debug):
        net = build_from_spec(model or DEFAULT_MODEL) if checkpoint is None else load_model(checkpoint, model, trust=trust)
        unrecognized = find_unrecognized(net)
        unverified = []
        try:
            chosen = resolve_loss(loss)
            loaded = load_data(data, 2)
            loader, _, _ = make_loader(digits_form(net) if loaded is None else loaded, 2, 0)
            batch = take_batches(loader, 1, model_device(net), floating_dtype(net), no_progress, chosen)[0]
            found, _, unverified = check_fit(net, batch, chosen or ignore_loss)
            note = "found by one forward pass on --data (modules and functional calls)"
        except (DataShapeError, NoNormSitesError) as error:
            found = find_sites(net)
            note = f"modules only: functional calls need a forward pass, which failed ({error})"
    if json_output:
        typer.echo(json.dumps({"model": type(net).__name__, "note": note, "sites": [site_row(site) for site in found],
                               "unrecognized": [{"name": p, "module_type": c} for p, c in unrecognized],
                               "unverified": [{"name": c.site, "module_type": c.module_type, "reading": f"{c.kind}/{c.rule}",
                                               "compared": c.compared} for c in unverified]}, indent=2))
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
    if unverified:
        doubtful = Table(title="unverified sites: the reading does not reproduce the output, so no analysis uses them")
        for column in ("site", "module type", "reading", "what was compared"):
            doubtful.add_column(column)
        for check in unverified:
            doubtful.add_row(check.site, check.module_type, f"{check.kind}/{check.rule}", check.compared)
        console.print(doubtful)


def ignore_loss(outputs: object, targets: object) -> torch.Tensor:
    """Listing sites needs no loss: any model output is accepted."""
    return torch.zeros(())
