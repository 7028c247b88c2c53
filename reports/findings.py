"""Findings in plain words for report sections whose tables come without any (``compare_*``).

Analyzers write their own findings (``AnalysisResult.findings``); the comparison of ops arrives
as tables only, so its findings are derived here from ``compare_summary``.
"""

from __future__ import annotations

import pandas as pd

COMPARE_COLUMNS = {"op", "batch_size", "final_test_accuracy"}


def compare_findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Per batch size the ops with the highest and lowest final test accuracy, then how much each
    op's accuracy changes from the largest to the smallest batch size (``compare_summary``)."""
    summary = tables.get("compare_summary")
    if summary is None or not COMPARE_COLUMNS <= set(summary.columns):
        return []
    summary = summary.dropna(subset=["final_test_accuracy"])
    findings = []
    for size, rows in summary.groupby("batch_size", sort=True):
        rows = rows.sort_values("final_test_accuracy", ascending=False)
        best, worst = rows.iloc[0], rows.iloc[-1]
        if len(rows) == 1:
            findings.append(f"At batch size {size}, {best['op']} reaches {best['final_test_accuracy']:.1%} test accuracy.")
        else:
            findings.append(
                f"At batch size {size}, {best['op']} reaches the best test accuracy ({best['final_test_accuracy']:.1%}) "
                f"and {worst['op']} the lowest ({worst['final_test_accuracy']:.1%})."
            )
    sizes = sorted(summary["batch_size"].unique())
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        by_op = summary.pivot_table(index="op", columns="batch_size", values="final_test_accuracy")
        change = (by_op[small] - by_op[large]).dropna().sort_values()
        if not change.empty:
            parts = ", ".join(f"{op} {delta * 100:+.1f}" for op, delta in change.items())
            findings.append(f"Test accuracy from batch size {large} down to {small}, in points: {parts}.")
    return findings


DERIVED = {"compare": compare_findings}


def derived_findings(section: str, tables: dict[str, pd.DataFrame]) -> list[str]:
    """Findings computed from the tables of ``section``, for sections no analyzer reports on."""
    derive = DERIVED.get(section)
    return derive(tables) if derive else []
