"""``normscope train``: the built-in default training with the monitor on, then its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normscope.cli.boundary import boundary
from normscope.cli.options import flag


def train(
    out: Annotated[Path, typer.Option("--out", help="Run folder for the monitor's Parquet rows and the report.")] = Path("normscope-run"),
    model: Annotated[str, typer.Option("--model", help="Reference model: mlp_bn, resnet_bn, cnn_gn, transformer_ln, transformer_rms.")] = "mlp_bn",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the digits' training split.")] = 8,
    every: Annotated[int, typer.Option("--every", min=1, help="Statistics and GLS every N steps.")] = 5,
    every_curvature: Annotated[int, typer.Option("--every-curvature", min=0, help="Curvature every N steps (0: never).")] = 50,
    debug: Annotated[bool, flag("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Train the built-in default on the digits with normscope.Monitor on; print where the report is."""
    with boundary(debug):
        from normscope.models import build_model
        from normscope.monitor.demo import train_monitored
        from normscope.reports.timeseries import render_run

        build_model(model)  # a clear error for an unknown name before anything is written
        steps = train_monitored(out, model, epochs=epochs, every=every, every_curvature=every_curvature or None,
                                show_progress=True)
        page = render_run(out)
    typer.echo(f"{steps} steps monitored; rows in {out}/ (pandas.read_parquet), report: {page}")
