"""Figures of training dynamics (matplotlib, Agg), each written atomically as a PNG."""

import io
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from ..io import atomic_write_bytes  # noqa: E402

STATE_COLORS = plt.get_cmap("tab10").colors
TITLES = {  # panel titles of weight-statistic columns
    "dpo_loss": "DPO loss (ReprPO: its DPO term)", "l2": "l2: Frobenius norm of ΔW", "spectral": "spectral norm of ΔW",
    "code_sparsity": "code sparsity l1 / l2", "computational_sparsity": "computational sparsity trace / spectral",
    "sv_var": "variance of singular values",
}  # fmt: skip


def _save(figure, path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_llc(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]], path, colors: dict[str, str] | None = None) -> Path:
    """Two panels against step: the train loss, and the LLC (mean over chains, band: +-1 std over chains).
    `runs`: label -> (losses with columns step, loss; LLC table with columns step, llc_mean, llc_std)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, (losses, llc)) in enumerate(runs.items()):
        color = (colors or {}).get(label, STATE_COLORS[i % len(STATE_COLORS)])
        left.plot(losses.step, losses.loss, marker=".", ms=3, color=color, label=label, alpha=0.85)
        right.plot(llc.step, llc.llc_mean, marker="o", ms=3, color=color, label=label, alpha=0.85)
        right.fill_between(llc.step, llc.llc_mean - llc.llc_std, llc.llc_mean + llc.llc_std, color=color, alpha=0.15)
    left.set(xlabel="optimizer step", ylabel="train loss (the trainer's total)", title="Training loss")
    right.set(xlabel="optimizer step", ylabel="LLC estimate (band: ±1 sd over chains)", title="Local learning coefficient")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), bbox_to_anchor=(0.5, -0.08), frameon=False)
    return _save(figure, path)


def plot_model_selection(table: pd.DataFrame, selected: tuple[int, str], path) -> Path:
    """Test log-likelihood per observation, AIC and BIC against the number of states, one line per covariance
    type; models that were not eligible crossed, the selected one circled."""
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    titles = ("Test log-likelihood per observation (higher: better)", "AIC on train runs (lower: better)",
              "BIC on train runs (lower: better)")  # fmt: skip
    for axis, column, title in zip(axes, ("test_ll_per_obs", "aic", "bic"), titles):
        for covariance, rows in table.groupby("covariance"):
            axis.plot(rows.n_states, rows[column], marker="o", label=f"{covariance} covariance")
        excluded = table[~(table.identifiable & table.generalises)]
        axis.scatter(excluded.n_states, excluded[column], marker="x", s=40, color="k", zorder=3,
                     label="not eligible (parameters ≥ scalar observations,\nor held-out fit below 1 state)")  # fmt: skip
        chosen = table[(table.n_states == selected[0]) & (table.covariance == selected[1])]
        axis.scatter(chosen.n_states, chosen[column], s=180, facecolors="none", edgecolors="k", label="selected")
        values = table[column].abs().replace(0, np.nan).dropna()
        if len(values) and values.max() / values.min() > 100:
            axis.set_yscale("symlog")
        axis.set(xlabel="number of hidden states", title=title)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.1), frameon=False, fontsize=8)
    figure.suptitle("HMM model selection (selected: lowest BIC among eligible models)", y=1.02)
    return _save(figure, path)


def plot_states(states: pd.DataFrame, metric: str, path, n_states: int) -> Path:
    """Each run's `metric` curve against step, points coloured by their Viterbi state (one panel per run)."""
    runs = list(dict.fromkeys(states.run))
    columns = min(3, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, run in zip(axes.flat, runs):
        rows_of_run = states[states.run == run]
        axis.plot(rows_of_run.step, rows_of_run[metric], color="0.7", lw=1, zorder=1)
        for state in range(n_states):
            part = rows_of_run[rows_of_run.state == state]
            axis.scatter(part.step, part[metric], s=16, color=STATE_COLORS[state % 10], zorder=2)
        axis.set(title=run, xlabel="optimizer step")
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for axis in axes[:, 0]:
        axis.set_ylabel(metric)
    for axis in list(axes.flat)[len(runs) :]:
        axis.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=STATE_COLORS[s % 10], label=f"state {s}") for s in range(n_states)]
    figure.legend(handles=handles, loc="lower center", ncol=min(n_states, 8), bbox_to_anchor=(0.5, -0.04), frameon=False)
    figure.suptitle(f"{metric} coloured by HMM state (Viterbi)", y=1.0)
    figure.tight_layout()
    return _save(figure, path)


def plot_transitions(counts: pd.DataFrame, n_states: int, occupancy: dict[int, int], path) -> Path:
    """The observed transition graph: states on a circle (area: rows spent in the state), an arrow per observed
    transition with width proportional to its count, labelled with the count."""
    figure, axis = plt.subplots(figsize=(5.5, 5.5))
    angles = np.linspace(np.pi / 2, np.pi / 2 + 2 * np.pi, n_states, endpoint=False)
    position = {s: (np.cos(a), np.sin(a)) for s, a in enumerate(angles)}
    largest = max(counts["count"].max(), 1) if len(counts) else 1
    for row in counts.itertuples():
        arrow = FancyArrowPatch(position[row.source], position[row.target], connectionstyle="arc3,rad=0.18",
                                arrowstyle="-|>", mutation_scale=14, lw=0.8 + 5 * row.count / largest, color="0.35",
                                shrinkA=22, shrinkB=22, zorder=1)  # fmt: skip
        axis.add_patch(arrow)
        (x0, y0), (x1, y1) = position[row.source], position[row.target]
        mid = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + 0.12 * np.array([y1 - y0, x0 - x1])
        axis.text(*mid, str(row.count), fontsize=9, ha="center", va="center", color="0.15")
    total = max(sum(occupancy.values()), 1)
    for s, (x, y) in position.items():
        axis.scatter(x, y, s=300 + 2500 * occupancy.get(s, 0) / total, color=STATE_COLORS[s % 10], zorder=2, edgecolors="k")
        axis.text(x, y, str(s), ha="center", va="center", fontsize=11, fontweight="bold", zorder=3)
    axis.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal", title="Observed state transitions (Viterbi, all runs)")
    axis.axis("off")
    axis.text(0, -1.45, "node area: time spent in the state; arrow width and label: transition count", ha="center",
              fontsize=8, color="0.3")  # fmt: skip
    return _save(figure, path)


def plot_traces(traces: dict[str, tuple[pd.DataFrame, dict]], path, expected: dict[str, float] | None = None) -> Path:
    """SGLD diagnostics, one panel per estimate: n_beta (L(w_t) - L(w*)) of every chain against the SGLD step
    (faint) and its rolling mean over chains (a good step size levels off; a diverging one climbs), with the LLC
    estimate and, when known, the true value."""
    figure, axes = plt.subplots(1, len(traces), figsize=(3.6 * len(traces), 3.3), squeeze=False)
    for axis, (label, (trace, summary)) in zip(axes[0], traces.items()):
        excess = trace.assign(excess=summary["nbeta"] * (trace.loss - summary["init_loss"]))
        for chain, rows in excess.groupby("chain"):
            axis.plot(rows.sgld_step, rows.excess, lw=0.5, alpha=0.3, color=STATE_COLORS[chain % 10])
        mean = excess.groupby("sgld_step").excess.mean()
        axis.plot(mean.index, mean.rolling(max(len(mean) // 20, 1), min_periods=1).mean(), color="k", lw=1.2,
                  label="rolling mean over chains")  # fmt: skip
        axis.axhline(summary["llc_mean"], color="C0", lw=1.5, label="LLC estimate")
        if expected and label in expected:
            axis.axhline(expected[label], color="C3", ls="--", lw=1.5, label="true LLC (d/2)")
        axis.set(title=f"{label}: estimate {summary['llc_mean']:.2f}", xlabel="SGLD step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("nβ · (L(w) − L(w*))")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.1), frameon=False)
    figure.suptitle("SGLD loss traces, one colour per chain (bounded and level: the step size is fine)", y=1.03)
    return _save(figure, path)


def plot_weight_stats(table: pd.DataFrame, columns: tuple[str, ...], path, colors: dict[str, str], title: str) -> Path:
    """One panel per column against step: every run thin, the mean over a method's runs thick."""
    n_cols = 3
    n_rows = math.ceil(len(columns) / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.3 * n_cols, 3.0 * n_rows), squeeze=False)
    for axis, column in zip(axes.flat, columns):
        for (method, run), rows in table.groupby(["method", "run"]):
            axis.plot(rows.step, rows[column], color=colors[method], lw=0.7, alpha=0.45)
        for method, rows in table.groupby("method"):
            mean = rows.groupby("step")[column].mean()
            axis.plot(mean.index, mean.values, color=colors[method], lw=2.2, label=f"{method} (mean over seeds)")
        axis.set(title=TITLES.get(column, column), xlabel="optimizer step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(columns) :]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.03), frameon=False)
    figure.suptitle(f"{title} (thin: one seed)", y=1.0)
    figure.tight_layout()
    return _save(figure, path)
