"""The rules that turn analyzer tables into findings (:class:`~normscope.findings.Finding`).

One function per analyzer; every number a sentence states is read from a table column with the
same statistic its figure plots, and recorded in the finding (``table``, ``where``, ``metric``).

* Running statistics (:func:`stats_findings`): the median over channels of the batch/running
  variance ratio outside :data:`VAR_RATIO_BAND`, mean drift ``|mu_B - mu_run| / sqrt(var_run + eps)``
  above :data:`DRIFT_WARNING`, and the cost: eval loss and accuracy with the running statistics
  against the same with population statistics (``stats_recalibration``). Kinds without running
  statistics (LayerNorm, GroupNorm, RMSNorm) get no running-statistics finding.
* Descent (:func:`descent_verdicts`): one verdict per mode from ``lr``, the critical step
  ``a_crit = 2 ||d||^2 / d^T H d`` along the step, ``2 / lambda_max`` and the step where the
  quadratic model parts from the loss.
* Bias (:func:`measurable`, :func:`log_log_fit`): a bias is measurable when its confidence
  interval lies above 0 and above the control estimator's estimate at the same batch size (the
  noise floor); slopes are fitted on three or more measurable points.
* Gradient least squares (:func:`gls_findings`): sites ranked by the median R^2 over partitions,
  the statistic the figure plots.

Papers: "Normalization Gradients are Least-Squares Residuals" (anonymous, ICLR 2019 submission);
"Extreme Normalization: Approximating Full-Data Batch Normalization with Single Examples"
(anonymous, under review); Ioffe & Szegedy, "Batch Normalization", ICML 2015; Ioffe, "Batch
Renormalization", NeurIPS 2017.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from torch import nn

from normscope.findings import Finding, number, percent, plural

VAR_RATIO_BAND = (0.5, 2.0)
VAR_RATIO_CRITICAL = (0.1, 10.0)
DRIFT_WARNING = 0.5
DRIFT_CRITICAL = 2.0
EPS_NOTE = 0.1
EPS_WARNING = 0.5
RELU_DEAD = 0.9
ACCURACY_COST = 0.02
LOSS_COST = 1.25
MIN_SLOPE_POINTS = 3
WIDE_INTERVAL = 1.0
"""A bias interval wider than this (100% of the population gradient's norm) says nothing at this number of draws."""
RECALIBRATE_HINT = "`normscope.recalibrate(model, data)` returns a copy with the population statistics"
"""The advice of a stale-statistics finding for a model given as an object (the API);
:func:`recalibrate_hint` fits it to a checkpoint or a factory, :func:`advise` puts it in the findings."""


def _site_finding(analyzer: str, sentence: str, severity: str, row, label: str, metric: str, threshold: float = math.nan,
                  table: str = "stats_sites") -> Finding:
    return Finding(sentence, analyzer, severity, site=str(row["site"]), label=label, metric=metric,
                   value=float(row[metric]), threshold=threshold, table=table, where={"site": row["site"]})


# ---------------------------------------------------------------- running statistics


def stats_findings(sites: pd.DataFrame, recalibration: pd.DataFrame | None = None) -> list[Finding]:
    """Findings of the stats analyzer, most severe first (see the module docstring)."""
    out: list[Finding] = []
    if sites.empty:
        return out
    for _, row in sites.iterrows():
        if row["nonfinite"]:
            out.append(_site_finding("stats", f"{row['site']}: {plural(int(row['nonfinite']), 'NaN or Inf value')} in its "
                                     "input, output or gradient.", "critical", row, "non-finite values", "nonfinite", 0))
    low, high = VAR_RATIO_BAND
    running = sites[np.isfinite(pd.to_numeric(sites["var_ratio_median"], errors="coerce"))]
    for _, row in running.iterrows():
        ratio = float(row["var_ratio_median"])
        if not low <= ratio <= high:
            severe = not VAR_RATIO_CRITICAL[0] <= ratio <= VAR_RATIO_CRITICAL[1]
            direction = "smaller" if ratio < 1 else "larger"
            out.append(_site_finding(
                "stats",
                f"{row['site']}: stale running variance. The batch variance is {number(ratio)} times the running "
                f"variance (median over channels; expected between {low:g} and {high:g}), so in eval mode this layer's "
                f"output is about {number(math.sqrt(ratio), 2)} times as wide as in training ({direction}); "
                f"{RECALIBRATE_HINT}.",
                "critical" if severe else "warning", row, "stale running variance", "var_ratio_median",
                low if ratio < low else high))
    for _, row in running.sort_values("mean_drift_mean", ascending=False).iterrows():
        drift = float(row["mean_drift_mean"])
        if drift >= DRIFT_WARNING:
            out.append(_site_finding(
                "stats",
                f"{row['site']}: stale running mean. Batch means sit {number(drift)} running standard deviations from the "
                f"running means (mean over channels; threshold {DRIFT_WARNING:g}), so eval mode shifts this layer's "
                f"output; {RECALIBRATE_HINT}.",
                "critical" if drift >= DRIFT_CRITICAL else "warning", row, "stale running mean", "mean_drift_mean", DRIFT_WARNING))
    if recalibration is not None and len(recalibration) == 2:
        out.append(_recalibration_finding(recalibration, bool(out)))
    for _, row in sites.sort_values("eps_fraction_max", ascending=False).iterrows():
        share = float(row["eps_fraction_max"])
        if share >= EPS_NOTE:
            out.append(_site_finding(
                "stats",
                f"{row['site']}: eps is up to {percent(share)} of the normalizer (eps / (variance + eps), largest over "
                f"partitions; {percent(row['eps_dominated_fraction'])} of partitions above half), so the output variance "
                "falls below 1 there.",
                "warning" if share >= EPS_WARNING else "note", row, "eps dominates", "eps_fraction_max", EPS_NOTE))
    for _, row in sites.iterrows():
        if row["relu_zero_fraction"] >= RELU_DEAD:
            out.append(_site_finding("stats", f"{row['site']}: the ReLU after it zeroes {percent(row['relu_zero_fraction'])} "
                                     "of the outputs.", "warning", row, "dead ReLU", "relu_zero_fraction", RELU_DEAD))
    if all(f.severity == "ok" for f in out):
        sentence = f"{plural(len(sites), 'site')}: eps below {EPS_NOTE:.0%} of every normalizer"
        if len(running):
            sentence += (f"; running statistics match the batch statistics (variance ratio between {low:g} and {high:g}, "
                         f"mean drift below {DRIFT_WARNING:g} running std) at {plural(len(running), 'site')}")
        out.append(Finding(sentence + ".", "stats", "ok", metric="eps_fraction_max", value=float(sites["eps_fraction_max"].max()),
                           threshold=EPS_NOTE, table="stats_sites", statistic="max", label="healthy"))
    return sorted(out, key=lambda f: f.rank)


def _recalibration_finding(table: pd.DataFrame, stale: bool) -> Finding:
    """Eval loss and accuracy with the running statistics against population statistics."""
    running = table[table["statistics"] == "running"].iloc[0]
    population = table[table["statistics"] == "population"].iloc[0]
    accuracy = np.isfinite(running["accuracy"]) and np.isfinite(population["accuracy"])
    cost_accuracy = accuracy and population["accuracy"] - running["accuracy"] > ACCURACY_COST
    cost_loss = running["loss"] > LOSS_COST * population["loss"]
    costly = cost_accuracy or cost_loss
    scores = f"loss {number(running['loss'])}" + (f", accuracy {percent(running['accuracy'])}" if accuracy else "")
    fixed = f"loss {number(population['loss'])}" + (f", accuracy {percent(population['accuracy'])}" if accuracy else "")
    sentence = (f"Cost of the running statistics: in eval mode the model scores {scores} on {plural(int(running['examples']), 'example')} "
                f"of the data; with population statistics measured on the same data it scores {fixed}.")
    sentence += f" {RECALIBRATE_HINT[0].upper()}{RECALIBRATE_HINT[1:]}." if costly or stale else " Recalibrating would not help."
    metric = "accuracy" if accuracy else "loss"
    return Finding(sentence, "stats", "critical" if costly else "ok", label="running statistics cost" if costly else "running statistics fine",
                   metric=metric, value=float(running[metric]), threshold=float(population[metric]),
                   table="stats_recalibration", where={"statistics": "running"})


def recalibrate_hint(checkpoint: str | None, model: str | None, data: str = "digits") -> str:
    """The recalibration advice that fits how ``normscope analyze`` was given the model: the
    ``normscope recalibrate`` command for a checkpoint (with its ``--model`` and ``--data``); with
    no checkpoint, the API call on the factory (``--model pkg.module:fn``) or on the model."""
    if checkpoint:
        options = (f" --model {model}" if model else "") + ("" if data in ("digits", None) else f" --data {data}")
        return f"`normscope recalibrate {checkpoint}{options} --out fixed.pt` writes a copy with the population statistics"
    if model and ":" in model:
        module, _, function = model.partition(":")
        return (f"with no checkpoint, `normscope.recalibrate({function}(), data)` (after `from {module} import {function}`) "
                "returns a copy with the population statistics")
    return ("the built-in model was trained for this analysis and not saved, so there is no checkpoint to recalibrate; "
            f"in Python, {RECALIBRATE_HINT}")


def advise(findings: dict[str, list], hint: str) -> dict[str, list]:
    """``findings`` with :data:`RECALIBRATE_HINT` replaced by ``hint`` in every sentence that carries it
    (also where it opens a sentence, capitalized)."""

    def capital(text: str) -> str:
        return text[0].upper() + text[1:]

    def swap(finding):
        if not isinstance(finding, Finding) or (RECALIBRATE_HINT not in finding and capital(RECALIBRATE_HINT) not in finding):
            return finding
        return finding.reworded(str(finding).replace(RECALIBRATE_HINT, hint).replace(capital(RECALIBRATE_HINT), capital(hint)))

    return {name: [swap(f) for f in items] for name, items in findings.items()}


# ---------------------------------------------------------------- gradient least squares


def gls_findings(tables: dict[str, pd.DataFrame]) -> list[Finding]:
    """Findings of the gls analyzer: sites ranked by median R^2 over partitions (the statistic the
    figure plots), the naive-gradient gap and the supporting measurements."""
    sites = tables["gls_sites"]
    if sites.empty:
        return [Finding("No normalization site received a gradient, so there is no gradient regression to show.", "gls", "note")]
    out: list[Finding] = []
    active = sites[sites["batch_stats"].astype(bool)]
    if not active.empty:
        top, low = active.loc[active["r2_median"].idxmax()], active.loc[active["r2_median"].idxmin()]
        out.append(_site_finding("gls", f"{top['site']} explains the most of its incoming gradient: {percent(top['r2_median'])} "
                                 f"(median R² over {plural(int(top['n_partitions']), 'partition')}); its backward pass keeps only "
                                 "the residual.", "note", top, "explains most", "r2_median", table="gls_sites"))
        if low["site"] != top["site"]:
            out.append(_site_finding("gls", f"{low['site']} explains the least: {percent(low['r2_median'])} (median R² over "
                                     f"{plural(int(low['n_partitions']), 'partition')}).", "note", low, "explains least",
                                     "r2_median", table="gls_sites"))
        gap = active.loc[active["naive_gap"].idxmax()]
        out.append(_site_finding("gls", f"At {gap['site']} the naive gradient (gamma / s) dL/dy, which ignores that the "
                                 f"moments depend on the input, is off from the true dL/dx by {percent(gap['naive_gap'])} of its norm.",
                                 "note", gap, "naive gradient gap", "naive_gap", table="gls_sites"))
    frozen = sites[~sites["batch_stats"].astype(bool)]
    if not frozen.empty:
        out.append(Finding(f"{plural(len(frozen), 'site')} normalize with running statistics ({', '.join(frozen['site'][:3])}): "
                           "their backward pass removes nothing.", "gls", "note", label="running statistics in training",
                           metric="batch_stats", value=0, table="gls_sites", where={"site": frozen["site"].iloc[0]}))
    residual = sites["residual_backward"].astype(bool) if "residual_backward" in sites else pd.Series(True, index=sites.index)
    for _, row in sites[~residual].iterrows():
        out.append(_site_finding("gls", f"At {row['site']} ({row['kind']} reading of its op) the backward pass is not the least-squares "
                                 f"residual by design; it differs from the residual by {percent(row['identity_rel_max'])} "
                                 "(relative, largest partition): its R² describes the fit, not what the backward removes.",
                                 "note", row, "backward is not the residual", "identity_rel_max", table="gls_sites"))
    ident = sites.loc[residual, "identity_rel_max"].dropna()
    if not ident.empty:
        out.append(Finding(f"Capture check: s dL/dx = g − alpha − beta z holds to {ident.max():.1e} relative "
                           f"(measured in {', '.join(sorted(set(sites.loc[residual, 'dtype'])))}).", "gls", "ok", label="capture check",
                           metric="identity_rel_max", value=float(ident.max()), table="gls_sites", statistic="max"))
    for _, row in tables.get("gls_two_step", pd.DataFrame()).iterrows():
        out.append(Finding(f"{row['first_site']} then {row['second_site']} ({row['order']}): the second regression explains "
                           f"{percent(row['r2_second_on_residual'])} of what the first left.", "gls", "note", site=row["second_site"],
                           metric="r2_second_on_residual", value=row["r2_second_on_residual"], table="gls_two_step",
                           where={"first_site": row["first_site"], "second_site": row["second_site"], "order": row["order"]}))
    whatif = tables.get("gls_whatif", pd.DataFrame())
    if not whatif.empty and whatif["r2_extra"].notna().any():
        best = whatif.loc[whatif["r2_extra"].idxmax()]
        out.append(Finding(f"An extra {str(best['extra_partitioning']).replace('_', '-')} regression after {best['site']} would "
                           f"explain a further {percent(best['r2_extra'])} of its residual.", "gls", "note", site=best["site"],
                           metric="r2_extra", value=best["r2_extra"], table="gls_whatif", statistic="max"))
    sweep = tables.get("gls_batch_sweep", pd.DataFrame())
    if not sweep.empty and sweep["batch_size"].nunique() > 1:
        lo, hi = int(sweep["batch_size"].min()), int(sweep["batch_size"].max())
        mean = sweep.groupby("batch_size")["r2_mean"].mean()
        out.append(Finding(f"Averaged over sites, R² is {percent(mean[hi])} at batch size {hi} and {percent(mean[lo])} at batch size {lo} "
                           "(at batch size 2 the fit of two points is exact).", "gls", "note", metric="r2_mean", value=mean[hi],
                           table="gls_batch_sweep", where={"batch_size": hi}, statistic="mean"))
    reg = tables.get("gls_regularization", pd.DataFrame())
    if not reg.empty:
        small = int(reg["batch_size"].min())
        rows = reg[reg["batch_size"] == small]
        out.append(Finding(f"At batch size {small} the input gradients of the BatchNorms are on average {percent(rows['dist_plain'].mean())} "
                           f"(plain backward pass) and {percent(rows['dist_regularized'].mean())} (with the virtual-item regularization of "
                           "the least-squares paper) away from the large-batch gradient.", "gls", "note", metric="dist_plain",
                           value=rows["dist_plain"].mean(), table="gls_regularization", where={"batch_size": small}, statistic="mean"))
    return out


# ---------------------------------------------------------------- estimator bias


def measurable(table: pd.DataFrame) -> pd.Series:
    """Whether each row's bias is measurable: its interval lies above 0 and above the control
    estimator's estimate at the same batch size and group (``rel_bias_lo > max(0, control)``).
    The control is unbiased by construction, so its estimate is the noise floor of the repeats;
    the control itself is never measurable."""
    control = table[table["estimator"] == "control"].set_index(["batch_size", "group"])["rel_bias"]
    floor = pd.Series([control.get((b, g), 0.0) for b, g in zip(table["batch_size"], table["group"])], index=table.index).fillna(0.0)
    return (table["estimator"] != "control") & (table["rel_bias_lo"] > floor.clip(lower=0))


FLAT_FIT = 1e-12  # log-scale spread below which the bias is the same at every batch size


def log_log_fit(batch_sizes: np.ndarray, rel_bias: np.ndarray, keep: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """``log rel_bias = slope log B + intercept`` by least squares on the ``keep`` points, with
    the ``level`` confidence interval of the slope (Student t, n - 2 degrees of freedom); NaN
    with fewer than :data:`MIN_SLOPE_POINTS` points."""
    keep = np.asarray(keep, bool) & np.isfinite(rel_bias) & (rel_bias > 0)
    n = int(keep.sum())
    empty = {"slope": math.nan, "intercept": math.nan, "slope_lo": math.nan, "slope_hi": math.nan, "n_points": n}
    if n < MIN_SLOPE_POINTS or len(np.unique(batch_sizes[keep])) < MIN_SLOPE_POINTS:
        return empty
    logs = np.log(rel_bias[keep])
    if np.ptp(logs) <= FLAT_FIT:  # equal to rounding: a flat, exact fit (scipy's stderr would be 0/0 noise)
        return {"slope": 0.0, "intercept": float(logs.mean()), "slope_lo": 0.0, "slope_hi": 0.0, "n_points": n}
    fit = scipy_stats.linregress(np.log(batch_sizes[keep]), logs)
    half = scipy_stats.t.ppf(0.5 + level / 2, n - 2) * fit.stderr
    return {"slope": float(fit.slope), "intercept": float(fit.intercept), "slope_lo": float(fit.slope - half),
            "slope_hi": float(fit.slope + half), "n_points": n}


def single_value_sites(model: nn.Module, inputs, graph=None) -> list[str]:
    """The normalization sites that get one value per channel per example (2-D input, as after a
    fully connected layer), from the site graph (:mod:`normscope.capture.graph`: ``graph``, or one
    captured forward of two examples of ``inputs``, any form of :mod:`normscope.batch`)."""
    from normscope.capture.graph import covering
    from normscope.ops.norm_sites import norm_sites

    sites = norm_sites(model)
    return covering(graph, model, inputs, sites).single_value(sites)


def bias_findings(table: pd.DataFrame, slopes: pd.DataFrame, labels: dict[str, str], jacobian: pd.DataFrame | None = None,
                  examples: int = 0, single_value: list[str] | tuple = (), quick: bool = True) -> list[Finding]:
    """One finding per estimator, saying what is known and what is not: its bias at the smallest
    batch size against the noise floor (measurable, bounded above, or not measurable at this
    number of draws when the 95% interval is wider than :data:`WIDE_INTERVAL`), its slope against
    the batch size, and for two-stage backprop the gap on all ``examples`` (``jacobian``, no
    draws, so no sampling noise: :func:`two_stage_gap`). Then the control's noise floor."""
    total = table[table["group"] == "total"]
    if total.empty:
        return []
    smallest = int(total["batch_size"].min())
    out: list[Finding] = []
    control = total[(total["estimator"] == "control") & (total["batch_size"] == smallest)]
    floor = float(control["rel_bias"].iloc[0]) if len(control) else math.nan
    for estimator in total["estimator"].unique():
        if estimator == "control":
            continue
        rows = total[total["estimator"] == estimator].sort_values("batch_size")
        first = rows.iloc[0]
        where = {"estimator": estimator, "batch_size": int(first["batch_size"]), "group": "total"}
        label = labels.get(estimator, estimator)
        lo, hi = float(first["rel_bias_lo"]), float(first["rel_bias_hi"])
        interval = f"95% interval {percent(lo)} to {percent(hi)}"
        draws = plural(int(first["repeats"]), "draw")
        if bool(first["measurable"]):
            text = (f"{label} at batch size {smallest} is biased by {percent(first['rel_bias'])} of the population gradient "
                    f"({interval}; the control's noise floor is {percent(floor)})")
            severity, tag = ("warning" if estimator == "batchnorm" else "note"), "bias"
        elif hi - max(lo, 0.0) > WIDE_INTERVAL:
            text = (f"{label} at batch size {smallest}: not measurable at this number of draws (interval {percent(max(lo, 0.0))} "
                    f"to {percent(hi)} from {draws})" + ("; `--full` draws more" if quick else ""))
            severity, tag = "note", "not measurable at these draws"
        else:
            text = (f"{label} at batch size {smallest}: no bias above the noise, at most {percent(hi)} of the population gradient "
                    f"(estimate {percent(first['rel_bias'])}, {interval}, control's noise floor {percent(floor)}, {draws})")
            severity, tag = "note", "no measurable bias"
        text += _slope_clause(estimator, rows, slopes)
        if estimator == "two_stage" and jacobian is not None and len(jacobian):
            text += ". " + two_stage_gap(jacobian, examples, list(single_value))
        out.append(Finding(text.rstrip(".") + ".", "bias", severity, site=estimator, label=tag, metric="rel_bias",
                           value=first["rel_bias"], threshold=floor, table="bias_estimators", where=where))
    if len(control):
        c = control.iloc[0]
        out.append(Finding(f"Noise floor: the control estimator, unbiased by construction, shows an apparent bias of {percent(c['rel_bias'])} "
                           f"at batch size {smallest} (95% interval up to {percent(c['rel_bias_hi'])}); a bias counts as measurable when its "
                           f"interval lies above this floor ({plural(int(c['repeats']), 'repeat')}).", "bias", "ok", site="control", label="noise floor",
                           metric="rel_bias", value=c["rel_bias"], table="bias_estimators",
                           where={"estimator": "control", "batch_size": smallest, "group": "total"}))
    return sorted(out, key=lambda f: f.rank)


def _slope_clause(estimator: str, rows: pd.DataFrame, slopes: pd.DataFrame) -> str:
    """``"; it falls like B^-0.98 (...)"`` from ``bias_slopes``; for BatchNorm, why there is no slope."""
    slope = slopes[(slopes["estimator"] == estimator) & (slopes["group"] == "total")]
    if len(slope) and np.isfinite(slope["slope"].iloc[0]):
        s = slope.iloc[0]
        expect = "; the Extreme Normalization paper expects about −1 for BatchNorm" if estimator == "batchnorm" else ""
        return (f"; over the batch sizes it falls like B^{number(s['slope'], 2)} (log-log slope, 95% interval "
                f"{number(s['slope_lo'], 2)} to {number(s['slope_hi'], 2)}, over {plural(int(s['n_points']), 'measurable batch size')}{expect})")
    if estimator != "batchnorm":
        return ""
    n_points = int(slope["n_points"].iloc[0]) if len(slope) else 0
    which = (f"none of the {len(rows)} batch sizes has" if n_points == 0 else
             f"only {n_points} of the {len(rows)} batch sizes {'has' if n_points == 1 else 'have'}")
    return f"; no slope against the batch size, since {which} a measurable bias ({MIN_SLOPE_POINTS} needed)"


def two_stage_gap(jacobian: pd.DataFrame, n: int, single_value: list[str]) -> str:
    """The Jacobian-product gap of two-stage backprop on all ``n`` examples (no draws, so no
    sampling noise), explained for fully connected sites."""
    row = jacobian.iloc[0]
    levels = int(row["n_norm_layers"])
    text = (f"On all {plural(n, 'example')}, where no draw adds noise, it misses the population gradient by {percent(row['relative_gap'])}: "
            f"the Jacobian-product bias of {plural(levels, 'normalization level')} in series (exactly 0 with one level)")
    if single_value and levels > 1:
        text += (f". On this fully connected model most of it comes from per-example normalization over a single value: "
                 f"{', '.join(single_value[:3])} get one value per channel from each example (d = 1), so the first tower "
                 "normalizes x − mean = 0 and its per-example Jacobian is degenerate; the gap is a property of the "
                 "estimator, not a numerical error")
    return text


# ---------------------------------------------------------------- descent

VERDICT_COLUMNS = ["mode", "direction", "lr", "a_crit", "lambda_max", "stability_limit", "parting_step", "verdict", "severity"]


def descent_verdict(lr: float, a_crit: float, lambda_max: float, parting: float) -> tuple[str, str]:
    """``(verdict, severity)`` of one mode: not a descent direction when ``a_crit`` is NaN
    (``g^T d >= 0``); unstable along the top curvature direction when ``lr > 2 / lambda_max``
    (whatever ``a_crit``); not a descent step when ``lr >= a_crit``;
    beyond the quadratic model when ``lr >= parting``, else stable."""
    limit = 2.0 / lambda_max if lambda_max > 0 else math.inf
    if math.isnan(a_crit):
        return "not a descent direction", "critical"
    if lr > limit:
        return "unstable along the top curvature direction", "critical"
    if lr >= a_crit:
        return "not a descent step", "critical"
    if math.isfinite(parting) and lr >= parting:
        return "beyond the quadratic model", "warning"
    return "stable", "ok"


def descent_verdicts(tables: dict[str, pd.DataFrame], parting: dict[str, float]) -> pd.DataFrame:
    """The ``descent_verdicts`` table: per mode, along the step's direction (the optimizer's when
    given, else the gradient), lr, a_crit, lambda_max, 2/lambda_max, the parting step and the verdict."""
    directions, spectrum = tables["descent_directions"], tables["descent_spectrum"]
    rows = []
    for mode in directions["mode"].drop_duplicates():
        total = directions[(directions["mode"] == mode) & (directions["group"] == "total")]
        step = total.iloc[-1]
        top = spectrum[(spectrum["mode"] == mode) & (spectrum["group"] == "total") & (spectrum["rank"] == 1)]
        lam = float(top["eigenvalue"].iloc[0]) if len(top) else math.nan
        limit = float(top["stability_limit"].iloc[0]) if len(top) else math.nan
        part = float(parting.get(mode, math.nan))
        verdict, severity = descent_verdict(float(step["lr"]), float(step["a_crit"]), lam if np.isfinite(lam) else 0.0, part)
        rows.append({"mode": mode, "direction": step["direction"], "lr": float(step["lr"]), "a_crit": float(step["a_crit"]),
                     "lambda_max": lam, "stability_limit": limit, "parting_step": part, "verdict": verdict, "severity": severity})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def descent_findings(verdicts: pd.DataFrame) -> list[Finding]:
    """One finding per mode from ``descent_verdicts``, saying every figure it weighed."""
    out = []
    for _, row in verdicts.iterrows():
        lr, a_crit, limit, part = row["lr"], row["a_crit"], row["stability_limit"], row["parting_step"]
        where = {"mode": row["mode"]}
        along = f"a_crit = {number(a_crit)} along the {str(row['direction']).split(':')[0]} step"
        model_range = (f"the quadratic model describes the loss up to step {number(part)}" if math.isfinite(part)
                       else "the quadratic model describes the loss on the whole grid")
        verdict = row["verdict"]
        limit_clause = f"; 2/λ_max = {number(limit)}" if np.isfinite(limit) else ""
        if verdict.startswith("unstable"):
            growth = abs(1 - lr * row["lambda_max"])
            text = (f"{row['mode']} mode: {verdict}. The learning rate {number(lr)} is above 2/λ_max = {number(limit)} "
                    f"(λ_max = {number(row['lambda_max'])}, the largest curvature), so repeated steps grow the component along that "
                    f"direction by {number(growth, 2)}× per step. Along the step itself {along}"
                    f"{', so one step still lowers the loss' if lr < a_crit else ''}: a_crit uses the curvature d^T H d / ||d||² "
                    "along the step, an average over all directions that is at most λ_max, so it can be the larger figure.")
            metric, value, threshold = "stability_limit", limit, lr
        elif verdict == "not a descent direction":
            text = (f"{row['mode']} mode: {verdict}. Along the {str(row['direction']).split(':')[0]} update d (step = lr * d) the loss "
                    f"rises to first order (gᵀd >= 0): d is NOT a descent direction, so no step size lowers the quadratic model{limit_clause}.")
            metric, value, threshold = "a_crit", a_crit, lr
        elif verdict == "not a descent step":
            text = (f"{row['mode']} mode: {verdict}. The step (step = lr * d) with learning rate {number(lr)} is NOT a descent step: "
                    f"lr is above the critical step {along}, below which the quadratic model decreases{limit_clause}.")
            metric, value, threshold = "a_crit", a_crit, lr
        elif verdict == "beyond the quadratic model":
            text = (f"{row['mode']} mode: {verdict}. The learning rate {number(lr)} is below {along} and below 2/λ_max = "
                    f"{number(limit)}, but {model_range}, so these second-order figures do not describe a step of that size.")
            metric, value, threshold = "parting_step", part, lr
        else:
            text = (f"{row['mode']} mode: {verdict}. The learning rate {number(lr)} is below {along}, below 2/λ_max = "
                    f"{number(limit)}, and {model_range}.")
            metric, value, threshold = "a_crit", a_crit, lr
        out.append(Finding(text, "descent", row["severity"], label=verdict, metric=metric, value=value, threshold=threshold,
                           table="descent_verdicts", where=where))
    return out
