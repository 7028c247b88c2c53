"""Findings as data: each sentence a user reads carries the number it states and where it lives.

A :class:`Finding` is a ``str`` (the sentence, so lists of findings keep working as lists of
sentences) with the record behind it: severity, site, the table and row it was read from
(``table``, ``where``), the column (``metric``), the statistic taken over the matching rows
(``statistic``: ``value`` for one row, else ``mean``/``median``/``max``/``min``), the ``value``
and the ``threshold`` it was compared with. :func:`findings_table` turns findings into the
``findings`` table (``tables/findings.csv``, ``result.findings_table``); :func:`table_value`
recomputes a finding's number from its table, which the tests do for every finding.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np
import pandas as pd

SEVERITIES = ("critical", "warning", "note", "ok")
COLUMNS = ["analyzer", "severity", "rank", "site", "label", "metric", "statistic", "value", "threshold", "table", "where", "sentence"]
STATISTICS = ("value", "mean", "median", "max", "min")


class Finding(str):
    """A sentence with the record it was rendered from (see the module docstring).

    ``str(finding)`` is the sentence; :meth:`record` the row of the ``findings`` table.
    """

    analyzer: str
    severity: str
    site: str
    label: str
    metric: str
    statistic: str
    value: float
    threshold: float
    table: str
    where: dict

    def __new__(
        cls,
        sentence: str,
        analyzer: str = "",
        severity: str = "note",
        site: str = "",
        label: str = "",
        metric: str = "",
        value: float = math.nan,
        threshold: float = math.nan,
        table: str = "",
        where: dict | None = None,
        statistic: str = "value",
    ) -> "Finding":
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES} (got {severity!r})")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS} (got {statistic!r})")
        self = super().__new__(cls, sentence)
        self.analyzer, self.severity, self.site, self.label = analyzer, severity, site, label
        self.metric, self.statistic, self.table = metric, statistic, table
        self.value, self.threshold = _float(value), _float(threshold)
        self.where = dict(where or {})
        return self

    @property
    def rank(self) -> int:
        """0 for critical, 1 warning, 2 note, 3 ok: smaller is more severe."""
        return SEVERITIES.index(self.severity)

    def reworded(self, sentence: str) -> "Finding":
        """The same record with another sentence (advice fitted to how the model was given)."""
        return Finding(sentence, self.analyzer, self.severity, self.site, self.label, self.metric, self.value,
                       self.threshold, self.table, self.where, self.statistic)

    def record(self) -> dict:
        """The finding as one row of the ``findings`` table (``where`` as JSON)."""
        return {
            "analyzer": self.analyzer, "severity": self.severity, "rank": self.rank, "site": self.site,
            "label": self.label, "metric": self.metric, "statistic": self.statistic, "value": self.value,
            "threshold": self.threshold, "table": self.table, "where": json.dumps(_plain(self.where), sort_keys=True),
            "sentence": str(self),
        }


def _float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _plain(where: dict) -> dict:
    return {str(k): (v.item() if isinstance(v, np.generic) else v) for k, v in where.items()}


def findings_table(findings: dict[str, Iterable[str]]) -> pd.DataFrame:
    """The ``findings`` table from findings by analyzer name, most severe first (stable within a
    severity). Plain strings (findings written before this record existed) become notes."""
    rows = []
    for analyzer, items in findings.items():
        for item in items:
            finding = item if isinstance(item, Finding) else Finding(str(item), severity="note")
            rows.append({**finding.record(), "analyzer": finding.analyzer or analyzer})
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values("rank", kind="stable").reset_index(drop=True)


def table_value(tables: dict[str, pd.DataFrame], table: str, where: dict | str, metric: str, statistic: str = "value") -> float:
    """The ``statistic`` of column ``metric`` over the rows of ``tables[table]`` matching ``where``
    (column -> value; a JSON string as stored in the ``findings`` table). ``value`` needs exactly
    one matching row.

    Raises:
        KeyError: no such table or column, or ``value`` matches other than one row.
    """
    where = json.loads(where) if isinstance(where, str) else where
    frame = tables[table]
    keep = np.ones(len(frame), dtype=bool)
    for column, wanted in where.items():
        keep &= (frame[column] == wanted).to_numpy()
    values = pd.to_numeric(frame.loc[keep, metric], errors="coerce")
    if statistic == "value":
        if len(values) != 1:
            raise KeyError(f"{table} has {len(values)} rows matching {where}, not one")
        return float(values.iloc[0])
    return float(getattr(values, statistic)())


def most_severe(table: pd.DataFrame, count: int = 5) -> pd.DataFrame:
    """The ``count`` most severe rows of a ``findings`` table that are not ``ok``."""
    return table[table["severity"].isin(SEVERITIES[:2])].head(count) if len(table) else table


# ---------------------------------------------------------------- wording


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 site"``, ``"2 sites"`` (``many`` for irregular plurals)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def number(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits; never ``nan`` (``not measured``) or ``inf`` (``∞``)."""
    value = _float(value)
    if math.isnan(value):
        return "not measured"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}g}"


def percent(value: float) -> str:
    """A fraction as a percentage (``12%``, ``0.4%``); ratios above 10 as ``37×``; never ``nan``."""
    value = _float(value)
    if math.isnan(value):
        return "not measured"
    if math.isinf(value):
        return "∞"
    if abs(value) >= 10:
        return f"{value:.3g}×"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.1%}" if abs(value) >= 0.001 else f"{value * 100:.1g}%"
    return f"{value:.0%}"


def seconds(value: float) -> str:
    """A duration as people read it: ``0 s`` below 0.05 s, ``2.5 s`` below 10 s, ``48 s``, ``3 min 20 s``;
    never ``1e-09 s``; ``not measured`` for NaN, ``no limit`` for None or infinity."""
    if value is None:
        return "no limit"
    value = _float(value)
    if math.isnan(value):
        return "not measured"
    if math.isinf(value):
        return "no limit"
    if value < 0.05:
        return "0 s"
    if value < 10:
        return f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"
