"""``normscope report DIR``: rebuild ``DIR/report.html`` from the saved tables.

``DIR`` is an output folder of ``normscope analyze`` (with ``--compare``, the tables of a
``normscope compare`` folder are added), a ``normscope compare`` folder on its own, or a
``normscope.Monitor`` run folder (``DIR/_report.html``; with ``--compare``, an ``analyze`` output
folder shown side by side). Every file is read and written through :mod:`normscope.safe_io`:
links, FIFOs and folders where files belong are refused with one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from normscope.cli.boundary import boundary, printable
from normscope.cli.options import flag
from normscope.errors import OutputError
from normscope.reports.timeseries import is_run_folder, render_run
from normscope.result import REPORT_FILE, SUMMARY_FILE, TABLES_DIR, AnalysisResult, read_tables

COMPARE_PREFIX = "compare_"


def report(
    folder: Annotated[Path, typer.Argument(help="An output folder of normscope analyze or normscope compare, or a normscope.Monitor run folder.", show_default=False)],
    compare: Annotated[
        Optional[Path],
        typer.Option("--compare", help="An output folder of normscope compare to include; for a run folder, an output folder of "
                     "normscope analyze to show side by side.", show_default=False),
    ] = None,
    debug: Annotated[bool, flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """Rebuild report.html in FOLDER from its tables and summary.json (and --compare results)."""
    with boundary(debug):
        if is_run_folder(folder):
            typer.echo(printable(str(render_run(folder, compare=compare))))
            return
        if not os.path.lexists(folder / SUMMARY_FILE) and compare is None and (folder / TABLES_DIR).is_dir():
            result, extra = AnalysisResult(meta={"model": {"name": f"comparison in {folder.name}"}}), compare_tables(folder)
        else:
            result = AnalysisResult.load(folder)
            extra = None if compare is None else compare_tables(compare)
        path = result.to_html(folder / REPORT_FILE, compare=extra)
    typer.echo(printable(str(path)))


def compare_tables(folder: Path) -> dict:
    """The ``compare_*`` tables written by ``normscope compare`` in ``folder/tables``."""
    tables = {name: t for name, t in read_tables(folder / TABLES_DIR).items() if name.startswith(COMPARE_PREFIX)}
    if not tables:
        raise OutputError(f"{folder} has no {COMPARE_PREFIX}* tables in {TABLES_DIR}/; pass a folder written by normscope compare")
    return tables
