"""The one-screen Rich summary printed at the end of ``normscope analyze``.

Every line built from a list says what it lists, and lists all of it: a section with nothing to
show is left out rather than printed as a title with nothing under it, and a sentence that ends
in a colon (the budget's account of its cuts) is followed by its items.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from normscope.cli.boundary import printable
from normscope.findings import seconds
from normscope.reports.render import headline_card
from normscope.result import AnalysisResult

MAX_FINDINGS = 1
MAX_SEVERE = 5
MAX_FIGURES = 4
COMPLETE = {"budget"}
"""Findings printed whole: a list whose first sentence introduces the rest."""


def print_summary(result: AnalysisResult, out: Path, console: Console, elapsed: float | None = None) -> None:
    """Model, sites, data and timing (``elapsed``: the whole command, loading and writing
    included); the most severe findings; then per analyzer its headline figures and top finding,
    and what the budget cut."""
    console.print(Panel(Group(*summary_parts(result, out, elapsed)), title="normscope analyze", expand=False))


def summary_parts(result: AnalysisResult, out: Path, elapsed: float | None = None) -> list[Table]:
    """The tables of the summary panel, in order; a table with no rows is left out. What the
    budget cut is the ``budget`` table, printed whole."""
    meta = result.meta
    kinds = Counter(site["kind"] for site in meta.get("sites", []))
    data = meta.get("data", {})
    overview = Table.grid(padding=(0, 2))
    overview.add_row("model", printable(f"{meta['model'].get('name') or meta['model']['class']} ({meta['model']['parameters']:,} parameters)"))
    overview.add_row("sites", ", ".join(f"{count} {kind}" for kind, count in kinds.items()) or "none recorded")
    overview.add_row("data", f"{data.get('source')}: {data.get('batches')} batches of {data.get('batch_size')} on {meta.get('device')}")
    analysis = meta["seconds"]["total"]
    overview.add_row("time", f"{seconds(elapsed)} in all (analysis {seconds(analysis)}; the rest loading the model and data and writing)"
                     if elapsed is not None else seconds(analysis))
    overview.add_row("output", printable(f"{out} (open {out / 'report.html'} for everything)"))
    parts = [overview]
    severe = result.findings_table
    severe = severe[severe["severity"].isin(("critical", "warning"))].head(MAX_SEVERE) if len(severe) else severe
    if len(severe):
        verdicts = Table(title="most severe findings", title_justify="left", show_header=False, box=None, padding=(0, 2))
        for _, row in severe.iterrows():
            verdicts.add_row(f"[{'red' if row['severity'] == 'critical' else 'yellow'}]{row['severity']}[/]", escape(row["sentence"]))
        parts.append(verdicts)
    for name in list(result.headline) + [n for n in result.findings if n not in result.headline]:
        figures = Table(title=name, title_justify="left", show_header=False, box=None, padding=(0, 2))
        for key, value in list(result.headline.get(name, {}).items())[:MAX_FIGURES]:
            label, text, interval = headline_card(key, value, result.tables)  # the report's card: bias says "not measurable"
            figures.add_row(label, f"{text} ({interval})" if interval else text)
        sentences = result.findings.get(name, [])
        for sentence in sentences if name in COMPLETE else sentences[:MAX_FINDINGS]:
            figures.add_row("•", escape(str(sentence)))
        if figures.row_count:
            parts.append(figures)
    return parts
