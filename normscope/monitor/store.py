"""A Parquet dataset that grows during training and stays readable if the process dies.

Rows ``(step, site, metric, value)`` (plus ``rank``) are buffered in memory; each flush writes
one complete file ``part-<rank>-<segment>-<n>.parquet`` under the run folder, first under a name
that starts with ``.`` (which Parquet readers skip), then renamed in one atomic step. A run killed at
any moment leaves only complete files, and ``pandas.read_parquet(folder)`` reads them all.

A folder only gains rows: every store is a new *segment* (a random id in its part names), so a
second store on the same folder, in the same process or another, never replaces a file of the first.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..safe_io import write_file

SCHEMA = pa.schema([("step", pa.int64()), ("rank", pa.int32()), ("site", pa.string()),
                    ("metric", pa.string()), ("value", pa.float64())])


class RecordStore:
    """Buffers rows and writes them to ``folder`` every ``flush_seconds`` (0: at every append)."""

    def __init__(self, folder: str | os.PathLike, flush_seconds: float = 10.0, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_seconds, self.rank = flush_seconds, rank
        self.files = 0
        self.segment = uuid.uuid4().hex[:12]
        self._columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self._last_flush = time.monotonic()

    def append(self, step: int, rows: list[tuple[str, str, float]], rank: int | None = None) -> None:
        """Add ``(site, metric, value)`` rows of one step; flush when the interval has passed."""
        rank = self.rank if rank is None else rank
        if rows:
            sites, metrics, values = zip(*rows)
            self._columns["step"] += [step] * len(rows)
            self._columns["rank"] += [rank] * len(rows)
            self._columns["site"] += sites
            self._columns["metric"] += metrics
            self._columns["value"] += values
        if self.due():
            self.flush()

    def last_step(self) -> int | None:
        """The largest step of the rows already in the folder (every segment; read from the part
        files' column statistics), ``None`` when it holds none."""
        steps = [group.column(0).statistics.max for part in self.folder.glob("part-*.parquet")
                 for meta in [pq.read_metadata(part)] for group in map(meta.row_group, range(meta.num_row_groups))]
        return max(steps, default=None)

    def due(self) -> bool:
        """Whether ``flush_seconds`` have passed since the last flush."""
        return time.monotonic() - self._last_flush >= self.flush_seconds

    def flush(self) -> Path | None:
        """Write the buffered rows as one complete Parquet file (temporary name, then rename)."""
        self._last_flush = time.monotonic()
        if not self._columns["step"]:
            return None
        table = pa.table(self._columns, schema=SCHEMA)
        name = f"part-{self.rank:03d}-{self.segment}-{self.files:06d}.parquet"
        final = write_file(self.folder / name, lambda stream: pq.write_table(table, stream))
        self.files += 1
        self._columns = {name: [] for name in SCHEMA.names}
        return final
