"""Findings in plain words for report sections whose tables arrive without any.

Analyzers write their own findings (``AnalysisResult.findings``); the tables of
``normscope compare`` reach :func:`normscope.reports.render.render_html` as tables only, so their
findings are recomputed here with :func:`normscope.compare.findings`, the sentences
``normscope compare`` itself prints.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from normscope.compare import findings as compare_summary_findings

COMPARE_COLUMNS = ("op", "batch_size", "final_test_accuracy")


def compare_findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Per batch size the op with the best final test accuracy against BatchNorm, and the runs
    that diverged (non-finite final training loss), from ``compare_summary``."""
    summary = tables.get("compare_summary")
    if summary is None or summary.empty or any(c not in summary.columns for c in COMPARE_COLUMNS):
        return []
    summary = summary.dropna(subset=["final_test_accuracy"])
    if "diverged" not in summary.columns:
        loss = pd.to_numeric(summary.get("final_train_loss", pd.Series(0.0, index=summary.index)), errors="coerce")
        summary = summary.assign(diverged=~np.isfinite(loss))
    return compare_summary_findings(summary)


DERIVED = {"compare": compare_findings}


def derived_findings(section: str, tables: dict[str, pd.DataFrame]) -> list[str]:
    """Findings computed from the tables of ``section``, for sections no analyzer reports on."""
    derive = DERIVED.get(section)
    return derive(tables) if derive else []
