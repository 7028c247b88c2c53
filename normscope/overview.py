"""The per-site overview: what each normalization layer is doing, one row per site.

:func:`sites_overview` joins the analyzers' per-site tables into ``sites_overview`` (like
WeightWatcher's per-layer details frame): kind, mean drift and variance ratio of the running
statistics, eps share, the median R^2 of the gradient least-squares fit, the naive-gradient gap,
the critical step of the site's own parameters against the learning rate, and a verdict, the
label of the most severe finding about the site. Missing is a state of its own: the ``missing``
column names each quantity not measured and why (:mod:`normscope.missing`), and a site with no
severe finding whose numbers are missing for a reason other than "not applicable" or "not run"
gets the verdict ``not measured (...)``, never ``no problem found``. :func:`attach` adds it and the
``findings`` table (:func:`normscope.findings.findings_table`) to a result.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normscope.findings import SEVERITIES, findings_table
from normscope.missing import reason, verdict_gaps

COLUMNS = ["site", "kind", "mean_drift", "var_ratio", "eps_share", "r2_median", "naive_gap", "a_crit", "lr", "lr_over_a_crit",
           "verdict", "severity", "missing"]
SOURCE_COLUMNS = ("mean_drift", "var_ratio", "eps_share", "r2_median", "naive_gap", "a_crit", "lr_over_a_crit")
SOURCES = {
    "stats_sites": {"mean_drift_mean": "mean_drift", "var_ratio_median": "var_ratio", "eps_fraction_max": "eps_share"},
    "gls_sites": {"r2_median": "r2_median", "naive_gap": "naive_gap"},
}


def _site_order(tables: dict[str, pd.DataFrame], sites: list[dict] | None) -> pd.DataFrame:
    if sites:
        return pd.DataFrame([{"site": s["name"], "kind": s.get("kind", "")} for s in sites]).drop_duplicates("site")
    frames = [tables[name][["site", "kind"]] for name in SOURCES if name in tables and {"site", "kind"} <= set(tables[name].columns)]
    return pd.concat(frames).drop_duplicates("site") if frames else pd.DataFrame(columns=["site", "kind"])


def sites_overview(tables: dict[str, pd.DataFrame], findings: pd.DataFrame, sites: list[dict] | None = None,
                   meta: dict | None = None) -> pd.DataFrame:
    """The ``sites_overview`` table (see the module docstring); ``sites`` is the metadata's list of
    sites in forward order (else the sites of the tables); ``meta`` the analysis metadata, which
    says why a number is missing."""
    frame = _site_order(tables, sites).reset_index(drop=True)
    for name, columns in SOURCES.items():
        table = tables.get(name)
        if table is not None and len(table) and "site" in table.columns:
            present = {k: v for k, v in columns.items() if k in table.columns}
            frame = frame.merge(table[["site", *present]].drop_duplicates("site").rename(columns=present), on="site", how="left")
    directions = tables.get("descent_directions")
    if directions is not None and len(directions):
        own = directions[(directions["mode"] == "train") & (directions["direction"] == "gradient")][["group", "a_crit", "lr"]]
        frame = frame.merge(own.rename(columns={"group": "site"}).drop_duplicates("site"), on="site", how="left")
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["lr_over_a_crit"] = pd.to_numeric(frame["lr"], errors="coerce") / pd.to_numeric(frame["a_crit"], errors="coerce")
    verdicts, severities, missing = [], [], []
    about = findings[findings["site"].astype(str) != ""] if len(findings) else findings
    measured = set(directions["group"]) if directions is not None and len(directions) else set()
    for _, row in frame.iterrows():
        site = row["site"]
        gaps = {c: reason(c, row["kind"], meta or {}, has_parameters=site in measured or not measured)
                for c in SOURCE_COLUMNS if pd.isna(row[c])}
        missing.append("; ".join(f"{c}: {why}" for c, why in gaps.items()))
        mine = about[about["site"] == site] if len(about) else about
        if len(mine):
            worst = mine.sort_values("rank", kind="stable").iloc[0]
            if worst["severity"] in SEVERITIES[:2]:
                verdicts.append(str(worst["label"] or worst["severity"]))
                severities.append(str(worst["severity"]))
                continue
        unknown = verdict_gaps(gaps)
        verdicts.append(f"not measured ({unknown})" if unknown else "no problem found")
        severities.append("note" if unknown else "ok")
    frame["verdict"], frame["severity"], frame["missing"] = verdicts, severities, missing
    return frame[COLUMNS]


def attach(result) -> None:
    """Add the ``findings`` and ``sites_overview`` tables to ``result`` (an
    :class:`~normscope.result.AnalysisResult` whose findings are filled in)."""
    table = findings_table({k: v for k, v in result.findings.items()})
    result.tables["findings"] = table
    result.tables["sites_overview"] = sites_overview(result.tables, table, (result.meta or {}).get("sites"), result.meta)
