"""The report's figures: one function per figure, each declaring the table columns it needs.

Every figure is registered with :func:`figure` together with its section, title, caption and
``requires`` (table name -> columns, see ``docs/tables.md``). :func:`render_figures` draws the
figures of a section whose data is present and, for the others, says what is missing, the way
Cockpit's plots skip themselves. Figures are drawn on ``matplotlib.figure.Figure`` objects
(the Agg canvas, no pyplot state) and embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

Tables = dict[str, pd.DataFrame]
DrawFn = Callable[[Tables, Figure], None]

DPI = 100
PALETTE = "colorblind"


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure: where it goes, what it needs and how it is drawn."""

    key: str
    section: str
    title: str
    caption: str
    requires: dict[str, tuple[str, ...]]
    size: tuple[float, float]
    draw: DrawFn


@dataclass(frozen=True)
class RenderedFigure:
    """A figure ready for the template: a base64 PNG, or the reason it was skipped."""

    key: str
    title: str
    caption: str
    png_base64: str | None = None
    width: int = 0
    height: int = 0
    skipped: str | None = None


FIGURES: list[FigureSpec] = []


def figure(
    section: str, title: str, caption: str, requires: dict[str, tuple[str, ...]], size: tuple[float, float] = (7.0, 3.4)
) -> Callable[[DrawFn], DrawFn]:
    """Register ``draw(tables, fig)`` as a figure of ``section`` that needs ``requires``."""

    def register(draw: DrawFn) -> DrawFn:
        FIGURES.append(FigureSpec(draw.__name__, section, title, caption, requires, size, draw))
        draw.__doc__ = f"Draw '{title}' on ``fig``: {caption}"
        return draw

    return register


def missing_data(tables: Tables, requires: dict[str, tuple[str, ...]]) -> list[str]:
    """What of ``requires`` is absent from ``tables``: ``"name (no table)"``, ``"name (empty)"``
    or ``"name.column"``."""
    missing: list[str] = []
    for name, columns in requires.items():
        table = tables.get(name)
        if table is None:
            missing.append(f"{name} (no table)")
        elif table.empty:
            missing.append(f"{name} (empty)")
        else:
            missing += [f"{name}.{c}" for c in columns if c not in table.columns]
    return missing


def render_figures(section: str, tables: Tables) -> list[RenderedFigure]:
    """Draw every figure of ``section`` whose required columns are present; skip the others."""
    return [_render(spec, tables) for spec in FIGURES if spec.section == section]


def _render(spec: FigureSpec, tables: Tables) -> RenderedFigure:
    missing = missing_data(tables, spec.requires)
    if missing:
        return RenderedFigure(spec.key, spec.title, spec.caption, skipped="needs " + ", ".join(missing))
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        fig = Figure(figsize=spec.size, dpi=DPI, layout="constrained")
        try:
            spec.draw(tables, fig)
        except _NoData as reason:
            return RenderedFigure(spec.key, spec.title, spec.caption, skipped=str(reason))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return RenderedFigure(spec.key, spec.title, spec.caption, encoded, width, height)


class _NoData(Exception):
    """Raised by a draw function whose tables are present but hold no usable rows."""


def _by_depth(table: pd.DataFrame) -> list[str]:
    """Site names in forward order (by ``depth`` when present, else first appearance)."""
    if "depth" in table.columns:
        return table.sort_values("depth", kind="stable")["site"].drop_duplicates().tolist()
    return table["site"].drop_duplicates().tolist()


def _finite(table: pd.DataFrame, columns: list[str], positive: bool = False, empty: str | None = None) -> pd.DataFrame:
    """The rows whose ``columns`` are finite (and > 0 if ``positive``); with ``empty``, raise
    :class:`_NoData` with that reason when none is left."""
    values = table[columns].apply(pd.to_numeric, errors="coerce")
    keep = np.isfinite(values).all(axis=1)
    if positive:
        keep &= (values > 0).all(axis=1)
    if empty is not None and not keep.any():
        raise _NoData(empty)
    return table[keep]


def _total(table: pd.DataFrame) -> pd.DataFrame:
    """The ``group == "total"`` rows when there are any, else the whole table."""
    total = table[table["group"].astype(str) == "total"]
    return total if not total.empty else table


def _batch_axis(ax, sizes) -> None:
    """A log2 x axis with one labelled tick per batch size."""
    sizes = sorted({int(v) for v in sizes})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in sizes])


def _legend_right(ax, *args, **kwargs) -> None:
    """A frameless legend outside the axes, to the right."""
    ax.legend(*args, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5), **kwargs)


def _site_ticks(ax, sites: list[str]) -> None:
    ax.set_xticks(range(len(sites)), sites, rotation=30 if len(sites) > 4 else 0, ha="right" if len(sites) > 4 else "center")


@figure(
    "stats",
    "Drift of the running statistics",
    "Per channel: mean_drift = |mu_B - running_mean| / sqrt(running_var + eps) and "
    "var_ratio = sigma_B^2 / running_var (MATH.md §1). Batch moments against the running "
    "(population) moments used at inference, seed 004 §2.",
    {"stats_channels": ("site", "mean_drift", "var_ratio")},
)
def stats_drift(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["stats_channels"], ["mean_drift", "var_ratio"], positive=False)
    table = table[table["var_ratio"] > 0]
    if table.empty:
        raise _NoData("no site keeps running statistics (only BatchNorm-style layers do), so there is no drift to show")
    sites = _by_depth(table)
    if len(sites) > 4:
        fig.set_size_inches(fig.get_figwidth(), 5.6)
        left, right = fig.subplots(2, 1, sharex=True)
    else:
        left, right = fig.subplots(1, 2)
    common = dict(x="site", order=sites, color="#4c72b0", fliersize=1.5, linewidth=0.8)
    sns.boxplot(data=table, y="mean_drift", ax=left, **common)
    sns.boxplot(data=table, y="var_ratio", ax=right, log_scale=True, **common)
    right.axhline(1.0, color="0.3", lw=1, ls="--")
    left.set(xlabel="", ylabel="mean drift (in running std)")
    right.set(xlabel="", ylabel="batch var / running var")
    for ax in (left, right):
        _site_ticks(ax, sites)


@figure(
    "stats",
    "Where eps dominates the variance",
    "Per channel: eps_fraction = eps / (sigma_B^2 + eps); above 0.5 eps outweighs the batch "
    "variance and Var(z) = sigma^2/(sigma^2 + eps) falls well below 1 (MATH.md §2, seed 002 §2).",
    {"stats_channels": ("site", "eps_fraction")},
)
def stats_eps(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["stats_channels"], ["eps_fraction"], positive=True, empty="stats_channels has no positive finite eps_fraction")
    sites = _by_depth(table)
    ax = fig.subplots()
    sns.stripplot(data=table, x="site", y="eps_fraction", order=sites, ax=ax, size=3, alpha=0.6, jitter=0.25, log_scale=True)
    ax.axhline(0.5, color="#c44e52", lw=1, ls="--", label="eps = batch variance")
    ax.set(xlabel="", ylabel="eps / (batch var + eps)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    _site_ticks(ax, sites)


@figure(
    "gls",
    "Gradient explained by the least-squares fit, by depth and kind",
    "Per site: median and 10-90% range over partitions of R^2 = 1 - ||g - alpha - beta z||^2 / ||g||^2, "
    "g = dL/dz (seed 002 Theorem 1, §3; MATH.md §2). The backward pass removes the explained part.",
    {"gls_sites": ("site", "kind", "depth", "r2_median", "r2_q10", "r2_q90")},
)
def gls_r2_depth(tables: Tables, fig: Figure) -> None:
    table = tables["gls_sites"].sort_values("depth", kind="stable").reset_index(drop=True)
    ax = fig.subplots()
    colors = dict(zip(sorted(table["kind"].unique()), sns.color_palette(PALETTE)))
    for kind, rows in table.groupby("kind", sort=True):
        err = np.vstack([rows["r2_median"] - rows["r2_q10"], rows["r2_q90"] - rows["r2_median"]]).clip(min=0)
        ax.errorbar(rows.index, rows["r2_median"], yerr=err, fmt="o", capsize=3, color=colors[kind], label=kind)
    top = float(np.nanmax(table[["r2_median", "r2_q90"]].to_numpy()))
    ax.set(xlabel="site (forward order)", ylabel="R^2 of g on z", ylim=(min(0.0, table["r2_q10"].min()), min(1.02, max(0.05, 1.15 * top))))
    ax.set_xlim(-0.5, len(table) - 0.5)
    _legend_right(ax, title="kind")
    _site_ticks(ax, table["site"].tolist())


@figure(
    "gls",
    "Gradient against normalized activation for one partition",
    "Each point is one element i of a partition: (z_i, g_i = dL/dz_i); the line is the fit alpha + beta z "
    "whose residual, divided by s, is dL/dx (seed 002 Figure 1 and Theorem 1; MATH.md §2).",
    {"gls_scatter": ("site", "partition", "z", "g", "fit")},
    size=(7.0, 3.3),
)
def gls_scatter(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_scatter"], ["z", "g", "fit"], empty="gls_scatter has no finite (z, g) pairs")
    columns = [c for c in ("site", "record", "partition") if c in table.columns]
    keys = table[columns].drop_duplicates()
    picks = keys.iloc[np.unique(np.linspace(0, len(keys) - 1, min(3, len(keys))).round().astype(int))]
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, (_, key) in zip(axes, picks.iterrows()):
        rows = table[np.logical_and.reduce([table[c] == key[c] for c in columns])].sort_values("z")
        if len(rows) <= 200:
            ax.vlines(rows["z"], rows["fit"], rows["g"], color="0.75", lw=0.6, label="residual")
        ax.scatter(rows["z"], rows["g"], s=9 if len(rows) <= 200 else 3, alpha=1.0 if len(rows) <= 200 else 0.35,
                   color="#4c72b0", zorder=3, lw=0, label="(z, g)")
        ax.plot(rows["z"], rows["fit"], color="#c44e52", lw=1.6, zorder=4, label="alpha + beta z")
        ax.set_title(f"{key['site']}, partition {key['partition']}", fontsize="small")
        ax.set(xlabel="z", ylabel="g = dL/dz" if ax is axes[0] else "")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False, fontsize="small")


@figure(
    "gls",
    "Error of the naive gradient",
    "Per site: ||naive - true|| / ||true|| with naive = (gamma / s) dL/dy, the expression of seed 003 that "
    "ignores the dependence of the moments on x; the difference is the explained part (alpha + beta z)/s "
    "(MATH.md §2).",
    {"gls_sites": ("site", "depth", "naive_gap")},
    size=(7.0, 3.0),
)
def gls_naive_gap(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_sites"].sort_values("depth", kind="stable"), ["naive_gap"], empty="gls_sites has no finite naive_gap")
    ax = fig.subplots()
    sns.barplot(data=table, x="site", y="naive_gap", ax=ax, color="#55a868", order=table["site"].tolist())
    ax.set(xlabel="", ylabel="relative error of naive gradient")
    _site_ticks(ax, table["site"].tolist())


@figure(
    "gls",
    "Explained fraction against batch size",
    "Mean over partitions of R^2 = 1 - ||g - alpha - beta z||^2 / ||g||^2 for each site, on the same data "
    "split into batches of each size (seed 002 §4.2, MATH.md §2).",
    {"gls_batch_sweep": ("site", "batch_size", "r2_mean")},
    size=(7.0, 3.0),
)
def gls_batch_sweep(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_batch_sweep"], ["batch_size", "r2_mean"], empty="gls_batch_sweep has no finite rows")
    ax = fig.subplots()
    sns.lineplot(data=table, x="batch_size", y="r2_mean", hue="site", hue_order=_by_depth(table), marker="o", ax=ax, palette=PALETTE, errorbar=None)
    _batch_axis(ax, table["batch_size"])
    ax.set(xlabel="batch size", ylabel="mean R^2")
    _legend_right(ax, title="site", fontsize="small")


@figure(
    "gls",
    "Small-batch regularization",
    "Relative distance of each site's gradient at batch size B to its gradient at the largest batch (thin: one "
    "line per site; bold: mean over sites), for the plain backward pass and seed 002's regularized one (two "
    "virtual items at z = +1 and -1 with running alpha*, beta*; seed 002 Appendix C, MATH.md §2).",
    {"gls_regularization": ("site", "batch_size", "dist_plain", "dist_regularized")},
    size=(7.0, 3.0),
)
def gls_regularization(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["gls_regularization"], ["batch_size", "dist_plain", "dist_regularized"],
                    empty="gls_regularization has no finite distances")
    ax = fig.subplots()
    for column, label, color in (("dist_plain", "plain", "#4c72b0"), ("dist_regularized", "regularized", "#dd8452")):
        rows = table[table[column] > 0]
        for _, site in rows.groupby("site"):
            ax.plot(site["batch_size"], site[column], "-", color=color, alpha=0.25, lw=0.8)
        mean = rows.groupby("batch_size")[column].mean()
        ax.plot(mean.index, mean.to_numpy(), "o-", color=color, lw=2, label=f"{label} (mean over sites)")
    _batch_axis(ax, table["batch_size"])
    ax.set(yscale="log", xlabel="batch size", ylabel="distance to large-batch gradient")
    _legend_right(ax, fontsize="small")


@figure(
    "bias",
    "Estimator bias against batch size",
    "Relative bias ||E g_hat - g*|| / ||g*|| of each estimator (all parameters), Monte-Carlo noise "
    "tr(Cov g_hat)/R removed, error bars = its confidence interval; log-log axes (seed 004 §2.2, MATH.md §4). "
    "Seed 004 expects roughly 1/B for BatchNorm.",
    {"bias_estimators": ("estimator", "batch_size", "group", "rel_bias", "rel_bias_lo", "rel_bias_hi")},
)
def bias_loglog(tables: Tables, fig: Figure) -> None:
    table = _finite(_total(tables["bias_estimators"]), ["batch_size", "rel_bias"], positive=True,
                    empty="bias_estimators has no positive finite rel_bias")
    ax = fig.subplots()
    names = sorted(table["estimator"].unique())
    offsets = np.exp(np.linspace(-0.06, 0.06, len(names))) if len(names) > 1 else [1.0]
    for color, offset, name in zip(sns.color_palette(PALETTE, len(names)), offsets, names):
        rows = table[table["estimator"] == name].groupby("batch_size", as_index=False)[["rel_bias", "rel_bias_lo", "rel_bias_hi"]].mean()
        low = (rows["rel_bias"] - rows["rel_bias_lo"]).clip(lower=0).fillna(0)
        high = (rows["rel_bias_hi"] - rows["rel_bias"]).clip(lower=0).fillna(0)
        ax.plot(rows["batch_size"], rows["rel_bias"], "o-", color=color, label=name, ms=4.5)
        ax.errorbar(rows["batch_size"] * offset, rows["rel_bias"], yerr=[low, high], fmt="none", ecolor=color, alpha=0.55, capsize=2, lw=0.9)
    ax.set(yscale="log", xlabel="batch size B", ylabel="relative bias")
    ax.set_ylim(bottom=table["rel_bias"].min() / 3)
    _batch_axis(ax, table["batch_size"])
    _legend_right(ax, title="estimator")


@figure(
    "bias",
    "Variance and direction of the estimators",
    "Left: tr(Cov g_hat) over R minibatches; right: cosine between the mean estimate and g* "
    "(all parameters; seed 004 §2.2, MATH.md §4).",
    {"bias_estimators": ("estimator", "batch_size", "group", "variance", "cosine")},
)
def bias_variance(tables: Tables, fig: Figure) -> None:
    table = _finite(_total(tables["bias_estimators"]), ["batch_size", "variance", "cosine"], empty="bias_estimators has no finite variance / cosine")
    left, right = fig.subplots(1, 2)
    names = sorted(table["estimator"].unique())
    common = dict(data=table, x="batch_size", hue="estimator", hue_order=names, marker="o", palette=PALETTE, errorbar=None)
    sns.lineplot(y="variance", ax=left, legend=False, **common)
    sns.lineplot(y="cosine", ax=right, **common)
    left.set(yscale="log" if (table["variance"] > 0).all() else "linear", xlabel="batch size B", ylabel="tr(Cov g_hat)")
    right.set(xlabel="batch size B", ylabel="cosine to g*")
    for ax in (left, right):
        _batch_axis(ax, table["batch_size"])
    _legend_right(right, title="estimator", fontsize="small")


@figure(
    "descent",
    "Critical step against the learning rate",
    "a_crit = 2 (-g^T d) / d^T H d along each direction d (the update per unit learning rate; "
    "2 ||d||^2 / d^T H d for d = -g), per layer block of H and in total, in train "
    "(batch statistics) and eval (running statistics) mode; the step lr * d is a descent step of the quadratic "
    "model when lr < a_crit (seed 003, MATH.md §5). Dashed: the learning rate.",
    {"descent_directions": ("mode", "group", "a_crit", "lr")},
    size=(7.0, 3.6),
)
def descent_acrit(tables: Tables, fig: Figure) -> None:
    every = tables["descent_directions"]
    table = _finite(every, ["a_crit"], positive=True,
                    empty="descent_directions has no positive finite a_crit (d^T H d <= 0 everywhere)")
    fig.set_size_inches(fig.get_figwidth(), min(6.0, 1.4 + 0.32 * table["group"].nunique()))
    ax = fig.subplots()
    style = "direction" if "direction" in table.columns and table["direction"].nunique() > 1 else None
    sns.scatterplot(data=table, x="a_crit", y="group", hue="mode", style=style, ax=ax, s=45, palette=PALETTE)
    for lr in pd.to_numeric(table["lr"], errors="coerce").dropna().unique():
        ax.axvline(lr, color="0.3", ls="--", lw=1)
    ax.set(xscale="log", xlabel="a_crit (log)", ylabel="")
    dropped = every.drop(index=table.index)
    if not dropped.empty:
        names = ", ".join(sorted({f"{m} · {g}" for m, g in zip(dropped["mode"], dropped["group"])})[:4])
        ax.set_title(f"not shown (d^T H d <= 0 or g^T d >= 0, no critical step): {names}", fontsize="small", loc="left", color="0.35")
    _legend_right(ax)


@figure(
    "descent",
    "Top Hessian eigenvalues",
    "Largest eigenvalues of the Hessian of the loss by Lanczos on Hessian-vector products "
    "(scipy eigsh); plain gradient descent is stable for lr < 2 / lambda_max, dashed: 2 / lr "
    "(MATH.md §5, seed 003).",
    {"descent_spectrum": ("mode", "group", "rank", "eigenvalue")},
    size=(7.0, 3.0),
)
def descent_spectrum(tables: Tables, fig: Figure) -> None:
    table = _finite(_total(tables["descent_spectrum"]), ["rank", "eigenvalue"], empty="descent_spectrum has no finite eigenvalues")
    ax = fig.subplots()
    hue = table["mode"] + (" · " + table["group"].astype(str) if table["group"].nunique() > 1 else "")
    sns.lineplot(data=table.assign(series=hue), x="rank", y="eigenvalue", hue="series", marker="o", ax=ax, palette=PALETTE, errorbar=None)
    directions = tables.get("descent_directions")
    if directions is not None and "lr" in directions.columns:
        for lr in pd.to_numeric(directions["lr"], errors="coerce").dropna().unique():
            if lr > 0:
                ax.axhline(2 / lr, color="0.3", ls="--", lw=1, label="2 / lr")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="rank", ylabel="eigenvalue")
    _legend_right(ax, fontsize="small")


@figure(
    "descent",
    "Quadratic model against the real loss",
    "L(theta + a d) on a grid of step sizes a (solid) against L - a ||d||^2 + a^2/2 d^T H d (dashed), one panel "
    "per mode; dotted: the step from which they part (relative error above the descent analyzer's threshold), "
    "where the second-order model of seed 003 stops describing the step (MATH.md §5).",
    {"descent_quadratic": ("mode", "step", "loss", "quadratic")},
    size=(7.0, 3.0),
)
def descent_quadratic(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["descent_quadratic"], ["step", "loss", "quadratic"], empty="descent_quadratic has no finite rows")
    modes = sorted(table["mode"].unique(), reverse=True)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        rows = table[table["mode"] == mode].sort_values("step")
        ax.plot(rows["step"], rows["loss"], "-", color="#4c72b0", label="loss")
        ax.plot(rows["step"], rows["quadratic"], "--", color="#dd8452", label="quadratic")
        step = _parting_step(rows)
        if np.isfinite(step):
            ax.axvline(step, color="0.35", ls=":", lw=1.2, label=f"parting at {step:.3g}")
        ax.set(title=f"{mode} mode", xlabel="step size a", ylabel="loss")
        ax.legend(frameon=False, fontsize="small", loc="upper left")


def _parting_step(rows: pd.DataFrame) -> float:
    """The descent analyzer's parting step of one mode (NaN without a ``rel_error`` column)."""
    if "rel_error" not in rows.columns:
        return float("nan")
    from normscope.analyzers.descent import parting_step

    return float(parting_step(rows))


@figure(
    "compare",
    "Training curves of the normalization ops",
    "Loss per step of a short seeded run of each op on the same data, one panel per batch size "
    "(seeds 002 §4.2 and 004 §5 compare these variants at small batches).",
    {"compare_curves": ("op", "batch_size", "step", "split", "loss")},
    size=(7.0, 3.2),
)
def compare_curves(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["compare_curves"], ["step", "loss"], empty="compare_curves has no finite losses")
    sizes = sorted(table["batch_size"].unique())[:4]
    axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
    ops = sorted(table["op"].unique())
    colors = dict(zip(ops, sns.color_palette(PALETTE)))
    for ax, size in zip(axes, sizes):
        rows = table[table["batch_size"] == size]
        for op, run in rows.groupby("op", sort=True):
            train, test = run[run["split"] == "train"], run[run["split"] != "train"]
            ax.plot(train["step"], train["loss"], "-", color=colors[op], lw=1.2, label=f"{op} (train)")
            ax.plot(test["step"], test["loss"], "o--", color=colors[op], ms=5, lw=1, label=f"{op} (test)")
        ax.set(title=f"batch size {size}", xlabel="step", ylabel="loss")
    handles, labels = axes[-1].get_legend_handles_labels()
    _legend_right(axes[-1], handles, labels, fontsize="small")


@figure(
    "compare",
    "Final test accuracy",
    "Test accuracy at the end of each op's run, by batch size (compare_summary).",
    {"compare_summary": ("op", "batch_size", "final_test_accuracy")},
    size=(7.0, 2.8),
)
def compare_accuracy(tables: Tables, fig: Figure) -> None:
    table = _finite(tables["compare_summary"], ["final_test_accuracy"], empty="compare_summary has no finite accuracy")
    ax = fig.subplots()
    sns.barplot(data=table, x="batch_size", y="final_test_accuracy", hue="op", ax=ax, palette=PALETTE)
    ax.set(xlabel="batch size", ylabel="test accuracy", ylim=(0, 1))
    _legend_right(ax, fontsize="small")
