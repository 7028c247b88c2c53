"""The result of an analysis: tables, findings, headline figures and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


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
