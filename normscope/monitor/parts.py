"""Reading a :class:`normscope.Monitor` run folder back, part file by part file, with checks.

Each ``part-*.parquet`` is read through :mod:`normscope.safe_io` (no symbolic links, FIFOs or
folders in place of files) and must parse and hold the columns of
:data:`normscope.monitor.store.SCHEMA` with types that cast to it; otherwise the run is refused
with one line naming the part. Empty parts are skipped; a run with no row at all is refused.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from normscope.checkpoint import first_line
from normscope.errors import OutputError
from normscope.monitor.store import SCHEMA
from normscope.safe_io import list_files, read_bytes

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


def part_files(folder: Path) -> list[Path]:
    """The ``part-*.parquet`` entries of ``folder`` (not yet checked: :func:`read_part` checks)."""
    return list_files(folder, folder, (PART_SUFFIX,), prefix=PART_PREFIX)


def read_part(path: Path, folder: Path) -> pa.Table:
    """One part file as a table of :data:`SCHEMA`.

    Raises:
        OutputError: unsafe to read, not Parquet, or without the columns or types of ``SCHEMA``.
    """
    data = read_bytes(path, folder)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise OutputError(f"{path} is not a readable Parquet part ({type(error).__name__}: {first_line(error)}); "
                          "remove it or pass the folder of a normscope.Monitor run") from error
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise OutputError(f"{path} lacks the column(s) {', '.join(missing)} of a normscope.Monitor part; "
                          "remove it or pass the folder of a normscope.Monitor run")
    try:
        return table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise OutputError(f"{path} has columns of the wrong type ({first_line(error)}); "
                          "remove it or pass the folder of a normscope.Monitor run") from error


def read_rows(folder: Path) -> pd.DataFrame:
    """Every row of every part of ``folder`` (columns of :data:`SCHEMA`).

    Raises:
        OutputError: a part is unusable (see :func:`read_part`), or the run has no rows.
    """
    folder = Path(folder)
    tables = [read_part(path, folder) for path in part_files(folder)]
    rows = pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=SCHEMA.names)
    if rows.empty:
        raise OutputError(f"{folder} holds no monitor rows yet (its part files are empty); run the training longer or pass another run folder")
    return rows
