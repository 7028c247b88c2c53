"""Why a number is missing: missing is a state of its own, with a reason.

A quantity of the per-site overview comes from one analyzer (:data:`SOURCES`). When it is
missing, :func:`reason` says why, from the analysis metadata (``meta["analyzers"]``,
``meta["analyzer_errors"]``, ``meta["budget"]["cuts"]``) and the site's kind:

* ``not measured: budget``: the analyzer ran, and the time budget cut the work that measures it;
* ``analyzer failed`` / ``not measured: skipped`` / ``not measured: interrupted``: the analyzer
  did not finish (its error is in ``meta["analyzer_errors"]``);
* ``not run``: the analyzer was not selected (``--analyzers``);
* ``not applicable``: the quantity does not exist for this site (running statistics of a kind
  that keeps none, the critical step of a site with no parameters of its own);
* ``not measured``: none of the above explains it.

:func:`cut_line` is the one line of the report's first screen (and of the terminal summary) that
lists what the budget cut and how to get it.
"""

from __future__ import annotations

import math

from normscope.findings import seconds

SOURCES = {
    "mean_drift": "stats", "var_ratio": "stats", "eps_share": "stats",
    "r2_median": "gls", "naive_gap": "gls",
    "a_crit": "descent", "lr": "descent", "lr_over_a_crit": "descent",
}
RUNNING_STATISTICS = {"mean_drift", "var_ratio"}
KINDS_WITH_RUNNING_STATISTICS = {"batchnorm"}
OWN_PARAMETERS = {"a_crit", "lr_over_a_crit"}
BUDGET = "not measured: budget"
FAILED = "analyzer failed"
NOT_RUN = "not run"
NOT_APPLICABLE = "not applicable"
NOT_MEASURED = "not measured"


def cuts_by_analyzer(meta: dict) -> dict[str, list[dict]]:
    """The budget's cuts grouped by analyzer name (``"descent (train mode)"`` counts for ``descent``)."""
    out: dict[str, list[dict]] = {}
    for cut in ((meta or {}).get("budget") or {}).get("cuts") or []:
        out.setdefault(str(cut.get("analyzer", "")).split(" ")[0], []).append(cut)
    return out


def analyzer_state(meta: dict, analyzer: str) -> str:
    """Why ``analyzer``'s numbers may be missing: ``""`` when it ran untouched by the budget,
    else one of the reasons of the module docstring."""
    meta = meta or {}
    error = str((meta.get("analyzer_errors") or {}).get(analyzer, ""))
    if analyzer not in (meta.get("analyzers") or ()):
        if error:
            return "not measured: skipped" if " skipped" in error else FAILED
        if "interrupted" in (meta.get("analyzer_errors") or {}):
            return "not measured: interrupted"
        return NOT_RUN
    return BUDGET if analyzer in cuts_by_analyzer(meta) else ""


def reason(column: str, kind: str, meta: dict, has_parameters: bool = True) -> str:
    """Why the overview's ``column`` is missing at a site of ``kind`` (see the module docstring)."""
    if column in RUNNING_STATISTICS and str(kind).lower() not in KINDS_WITH_RUNNING_STATISTICS:
        return NOT_APPLICABLE
    analyzer = SOURCES.get(column)
    state = analyzer_state(meta, analyzer) if analyzer and meta else ""
    if state:
        return state
    return NOT_APPLICABLE if column in OWN_PARAMETERS and not has_parameters else NOT_MEASURED


def verdict_gaps(missing: dict[str, str]) -> str:
    """The analyzers whose numbers a site's verdict lacks, with the reason
    (``"descent: budget"``), from ``{column: reason}``; not-applicable and not-run columns are no gap."""
    gaps: dict[str, str] = {}
    for column, why in missing.items():
        if why in (NOT_APPLICABLE, NOT_RUN):
            continue
        gaps.setdefault(SOURCES.get(column, column), why.removeprefix("not measured: "))
    return ", ".join(f"{analyzer}: {why}" for analyzer, why in gaps.items())


def cut_line(meta: dict) -> str:
    """One line: what the time budget cut, and how to get it (``""`` when nothing was cut)."""
    cuts = cuts_by_analyzer(meta)
    if not cuts:
        return ""
    budget = (meta or {}).get("budget") or {}
    limit = budget.get("seconds")
    parts = []
    for analyzer, items in cuts.items():
        modes: dict[str, list[str]] = {}
        for cut in items:
            what, mode = str(cut["what"]).replace(" of this mode", ""), _mode(str(cut["analyzer"]))
            modes.setdefault(what, []).extend([mode] if mode else [])
        whats = [f"{what} ({' and '.join(m)} mode)" if m else what for what, m in modes.items()]
        parts.append(f"{analyzer} ({'; '.join(whats)})")
    spent = f"the {seconds(limit)} budget" if isinstance(limit, (int, float)) and math.isfinite(limit) else "the time budget"
    return (f"Not measured, cut by {spent}: {'; '.join(parts)}. Every number shown is what finished; "
            "rerun with a larger `--budget SECONDS` (or `--budget 0`: no limit) to measure the rest.")


def _mode(analyzer: str) -> str:
    """``"train"`` from ``"descent (train mode)"``; ``""`` without a mode."""
    _, _, rest = analyzer.partition(" (")
    return rest.removesuffix(")").removesuffix(" mode")
