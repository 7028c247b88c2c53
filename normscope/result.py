"""The result of an analysis: tables, findings, headline figures and metadata, and their files.

An output folder holds ``tables/NAME.csv`` and ``tables/NAME.parquet`` for every table (see
``docs/tables.md``), ``summary.json`` (headline figures, findings and metadata) and
``report.html``. :meth:`AnalysisResult.save` writes it atomically; :meth:`AnalysisResult.load`
reads it back (tables from Parquet, which keeps the dtypes). Staging, concurrency and clean-up
are :mod:`normscope.output`'s; every file is written and read through :mod:`normscope.safe_io`
(no symbolic links, FIFOs or folders in place of files, formula cells neutralised in CSV).

Loading checks the schema of what it reads, so a crafted or damaged folder is one
:class:`~normscope.errors.OutputError` naming the file: ``summary.json`` must be an object whose
``findings`` map names to lists of sentences, ``headline`` names to objects and ``meta`` is an
object (its ``model`` an object or a name, its lists lists); every table must parse, and the
tables the report reads by column (:data:`REQUIRED_COLUMNS`) must have those columns.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normscope.checkpoint import first_line
from normscope.errors import OutputError
from normscope.output import check_out_path, exists, write_folder_atomic
from normscope.safe_io import list_files, read_bytes, write_csv, write_parquet, write_text

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
TABLES_DIR = "tables"
REQUIRED_COLUMNS = {
    "findings": ("analyzer", "severity", "rank", "site", "label", "sentence"),
    "sites_overview": ("site", "severity"),
    "descent_directions": ("mode", "direction", "group", "a_crit", "lr"),
    "bias_estimators": ("estimator", "batch_size", "group", "rel_bias", "rel_bias_lo", "rel_bias_hi"),
    "bias_slopes": ("estimator", "group", "slope", "n_points"),
}
META_LISTS = ("sites", "unrecognized", "unverified", "analyzers")


@dataclass
class AnalysisResult:
    """Everything ``normscope analyze`` produces, in memory.

    Attributes:
        tables: DataFrames by table name (see ``docs/tables.md``).
        findings: plain-language sentences per analyzer name, most important first.
        headline: scalar figures per analyzer name (what ``summary.json`` holds).
        meta: how the analysis was run: model, sites, data, batch size, seed, versions, timings.
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    findings: dict[str, list[str]] = field(default_factory=dict)
    headline: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def findings_table(self) -> pd.DataFrame:
        """Every finding as a record (severity, site, metric, value, threshold, table, sentence),
        most severe first: the ``findings`` table (see :mod:`normscope.findings`)."""
        return self.tables.get("findings", pd.DataFrame())

    @property
    def overview(self) -> pd.DataFrame:
        """One row per normalization site: the ``sites_overview`` table (see :mod:`normscope.overview`)."""
        return self.tables.get("sites_overview", pd.DataFrame())

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s content: headline, findings (sentences and records), meta and the
        table names, JSON-safe."""
        records = self.findings_table.to_dict("records") if len(self.findings_table) else []
        return to_plain(
            {"headline": self.headline, "findings": self.findings, "finding_records": records, "meta": self.meta,
             "tables": sorted(self.tables)}
        )

    def __repr__(self) -> str:
        """One short line: the model, the number of sites, tables and findings by severity."""
        model = (self.meta or {}).get("model") or {}
        name = model.get("name") or model.get("class") or "model" if isinstance(model, dict) else str(model)
        table = self.findings_table
        counts = table["severity"].value_counts().to_dict() if len(table) else {}
        severity = ", ".join(f"{counts[s]} {s}" for s in ("critical", "warning", "note", "ok") if counts.get(s))
        total = sum(len(v) for v in self.findings.values())
        return (f"AnalysisResult({name}: {len((self.meta or {}).get('sites', []))} sites, {len(self.tables)} tables, "
                f"{total} findings{f' ({severity})' if severity else ''}; see .overview, .findings_table, .tables)")

    def save(self, out: Path | str, overwrite: bool = False) -> Path:
        """Write the output folder ``out`` atomically and return its path.

        Everything is written to a temporary folder beside ``out`` and renamed into place at the
        end, so ``out`` appears complete or not at all; on an error or an interrupt the temporary
        folder is removed and the exception propagates.

        Args:
            out: the folder to create; it may exist only if empty (or if ``overwrite``).
            overwrite: replace an existing non-empty ``out``. Default: False.

        Raises:
            OutputError: ``out`` exists and is not empty, or the folder cannot be written.
        """
        out = Path(out)
        refuse_nonempty(out, overwrite)

        def write(staging: Path) -> None:
            try:
                write_tables(staging / TABLES_DIR, self.tables)
                write_text(staging / SUMMARY_FILE, json.dumps(self.summary(), indent=2, allow_nan=False) + "\n")
                write_text(staging / REPORT_FILE, render_page(self))
            except OutputError as error:  # name the output, not the hidden staging file
                cause = error.__cause__ or error
                raise OutputError(f"writing {out} failed ({type(cause).__name__}: {first_line(cause)}); nothing was written") from error

        try:
            write_folder_atomic(out, write, overwrite=overwrite)
        except OutputError:
            raise
        except Exception as error:
            raise OutputError(
                f"writing {out} failed ({type(error).__name__}: {first_line(error)}); nothing was written"
            ) from error
        return out

    @classmethod
    def load(cls, folder: Path | str) -> "AnalysisResult":
        """Read an output folder written by :meth:`save` (tables from Parquet, else CSV).

        Raises:
            OutputError: ``folder`` is missing or is not a normscope output folder, or a file in it
                is not what normscope writes (one line naming the file).
        """
        folder = Path(folder)
        summary_path = folder / SUMMARY_FILE
        if not os.path.lexists(summary_path):
            raise OutputError(f"{folder} is not a normscope output folder (no {SUMMARY_FILE}); pass a folder written by normscope analyze")
        try:
            summary = json.loads(read_bytes(summary_path, folder).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise OutputError(f"{summary_path} is not valid JSON ({first_line(error)}); re-run normscope analyze") from error
        check_summary(summary, summary_path)
        return cls(
            tables=read_tables(folder / TABLES_DIR, folder),
            findings=summary.get("findings", {}),
            headline=summary.get("headline", {}),
            meta=summary.get("meta", {}),
        )

    def to_html(self, path: Path | str, compare: dict[str, pd.DataFrame] | None = None) -> Path:
        """Write the self-contained HTML report to ``path`` (atomically) and return the path;
        ``compare`` adds the ``compare_*`` tables of ``normscope compare``."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create {path.parent} ({error.strerror or error}); choose another path") from error
        write_text(path, render_page(self, compare))
        return path

    def _repr_html_(self) -> str:
        """The report in a notebook, isolated in an iframe so its styles do not leak."""
        page = html.escape(render_page(self), quote=True)
        return f'<iframe srcdoc="{page}" style="width:100%;height:640px;border:0"></iframe>'


def render_page(result: AnalysisResult, compare: dict[str, pd.DataFrame] | None = None) -> str:
    """The report page from :func:`normscope.reports.render.render_html`."""
    from normscope.reports.render import render_html

    return render_html(result, compare=compare)


def write_tables(folder: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Write each table as ``NAME.csv`` (formula cells neutralised) and ``NAME.parquet`` (raw
    values), without the index, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        frame = table.reset_index(drop=True)
        write_csv(folder / f"{name}.csv", frame)
        write_parquet(folder / f"{name}.parquet", frame)


def read_tables(folder: Path, root: Path | None = None) -> dict[str, pd.DataFrame]:
    """Tables by name from ``folder``: Parquet where present, CSV otherwise; listed and read
    through :mod:`normscope.safe_io` inside ``root`` (default: ``folder``'s parent) and checked
    (:func:`read_table`)."""
    root = folder.parent if root is None else root
    if not os.path.lexists(folder):
        return {}
    paths = {path.stem: path for path in list_files(folder, root, (".csv",))}
    paths.update({path.stem: path for path in list_files(folder, root, (".parquet",))})
    return {name: read_table(path, root) for name, path in sorted(paths.items())}


def read_table(path: Path, root: Path) -> pd.DataFrame:
    """One table file, parsed and checked against :data:`REQUIRED_COLUMNS`.

    Raises:
        OutputError: the file is unsafe to read, does not parse, or lacks required columns.
    """
    data = read_bytes(path, root)
    try:
        table = pd.read_parquet(io.BytesIO(data)) if path.suffix == ".parquet" else pd.read_csv(io.BytesIO(data))
    except Exception as error:  # a damaged file: pyarrow, pandas and the CSV parser raise many types
        raise OutputError(f"{path} is not a readable table ({type(error).__name__}: {first_line(error)}); re-run normscope analyze") from error
    missing = [column for column in REQUIRED_COLUMNS.get(path.stem, ()) if column not in table.columns]
    if missing:
        raise OutputError(f"{path} lacks the column(s) {', '.join(missing)} normscope writes; re-run normscope analyze")
    return table


def check_summary(summary: Any, path: Path) -> None:
    """Raise :class:`OutputError` naming ``path`` unless ``summary`` has the types
    :meth:`AnalysisResult.summary` writes (see the module docstring)."""
    def wrong(what: str, value: Any, expected: str) -> OutputError:
        return OutputError(f"{path}: {what} is {json_kind(value)}, not {expected}; pass a folder written by normscope analyze")

    if not isinstance(summary, dict):
        raise wrong("the content", summary, "an object")
    findings, headline, meta = summary.get("findings", {}), summary.get("headline", {}), summary.get("meta", {})
    for key, value, expected in (("findings", findings, dict), ("headline", headline, dict), ("meta", meta, dict)):
        if not isinstance(value, expected):
            raise wrong(f'"{key}"', value, "an object")
    for name, sentences in findings.items():
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise wrong(f'"findings"."{name}"', sentences, "a list of sentences")
    for name, figures in headline.items():
        if not isinstance(figures, dict):
            raise wrong(f'"headline"."{name}"', figures, "an object")
    if not isinstance(meta.get("model", {}), (dict, str)):
        raise wrong('"meta"."model"', meta["model"], "an object or a name")
    for key in META_LISTS:
        if not isinstance(meta.get(key, []), list):
            raise wrong(f'"meta"."{key}"', meta[key], "a list")
    if not isinstance(meta.get("analyzer_errors", {}), dict):
        raise wrong('"meta"."analyzer_errors"', meta["analyzer_errors"], "an object")
    sites = meta.get("sites", [])
    if not all(isinstance(site, dict) and isinstance(site.get("name"), str) for site in sites):
        raise OutputError(f'{path}: "meta"."sites" must list objects with a "name"; pass a folder written by normscope analyze')


def json_kind(value: Any) -> str:
    """How JSON calls the type of ``value`` (with the value, when short)."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value))
    kind = kind or ("a number" if isinstance(value, (int, float)) else type(value).__name__)
    shown = json.dumps(value) if isinstance(value, (int, float, str, bool)) or value is None else ""
    return f"{kind} {shown[:40]}" if shown and value is not None else kind


def refuse_nonempty(out: Path, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``out`` is not a usable output path (``.``, ``..``, a name
    too long), or exists and is not an empty folder, unless ``overwrite``."""
    check_out_path(out)
    if exists(out) and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"output folder {out} already exists and is not empty; choose another --out or pass --overwrite")


def to_plain(value: Any) -> Any:
    """``value`` as JSON-safe Python: numpy scalars unwrapped, NaN/Inf as None, other objects as str."""
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)

