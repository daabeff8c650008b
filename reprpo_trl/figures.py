"""Figures of reports, drawn to be read at one column width (3.5 in, 7 pt text): means with 95% intervals over
seeds as points and whiskers, never bars from zero; no whisker where there is no interval (one seed); every axis
labelled; reference lines (chance, base) labelled where they are drawn; how many seeds and pairs stand behind each
point stated in the title and the legend. Written as PNG bytes (matplotlib, Agg)."""

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper
STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5,
         "legend.fontsize": 6.5, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.0,
         "axes.spines.top": False, "axes.spines.right": False}  # fmt: skip
MARKERS = "os^DvP*Xhp"


@dataclass(frozen=True)
class Panel:
    """One panel of an interval plot: which metric of the summary, its y label, and how to draw it."""

    metric: str
    ylabel: str
    reference: float | None = None  # a horizontal line ...
    reference_label: str = ""  # ... and what it means ("chance", "base")
    ratio: bool = False  # a ratio: the axis is centred on 1 (and stops at 0)
    ylim: tuple[float, float] | None = None  # the axis covers at least this range
    include_base: bool = True  # False where the base is the reference line itself
    chance: bool = False  # draw each group's chance level (interval_plot's `chance`)


def to_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=200, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def seeds_label(label: str, counts, unit: str = "seed") -> str:
    """'dpo (3 seeds)', 'dpo (2-3 seeds)', 'dpo (1 seed, no interval)'."""
    low, high = int(min(counts)), int(max(counts))
    if high == 1:
        return f"{label} (1 {unit}, no interval)"
    return f"{label} ({low}{f'–{high}' if high != low else ''} {unit}s)"


def _limits(axis, panel: Panel, low: float, high: float) -> None:
    """y limits that show every point and whisker: centred on 1 for a ratio (never below 0), else at least
    `panel.ylim`."""
    if panel.ratio:
        margin = max(abs(low - 1), abs(high - 1), 0.05) * 1.1
        axis.set_ylim(max(0.0, 1 - margin), 1 + margin)
    elif panel.ylim:
        pad = 0.02 * (panel.ylim[1] - panel.ylim[0])
        axis.set_ylim(min(panel.ylim[0], low - pad), max(panel.ylim[1], high + pad))


def _reference(axis, y: float, label: str) -> None:
    axis.axhline(y, color="0.35", lw=0.8, ls="--", zorder=1)
    axis.annotate(label, xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points",
                  ha="left", va="center", fontsize=6, color="0.35", annotation_clip=False)  # fmt: skip


def interval_plot(summary: pd.DataFrame, panels: list[Panel], groups: list[str], labels: list[str], title: str,
                  base_label: str = "base", chance: dict[str, float] | None = None, width: float = COLUMN_WIDTH) -> bytes:  # fmt: skip
    """One panel per metric, stacked: x = `groups` (shifts, benchmarks, tasks), one point per label (method) with
    its 95% interval over seeds. `summary` has columns metric, label, shift (the group), mean, ci95, n_seeds.
    `chance`: group -> chance accuracy, drawn as a short labelled tick on panels whose reference is "chance"."""
    with plt.rc_context(STYLE):
        rotate = max(len(g) for g in groups) > 12 or len(groups) > 6
        figure, axes = plt.subplots(len(panels), 1, figsize=(width, 1.75 * len(panels) + 0.6), sharex=True, squeeze=False)
        colors = dict(zip(labels, plt.get_cmap("tab10").colors))
        legend = {}
        for axis, panel in zip(axes[:, 0], panels):
            part = summary[summary.metric == panel.metric].set_index(["label", "shift"])
            present = [x for x in labels if x in set(part.index.get_level_values(0)) and (panel.include_base or x != base_label)]
            step = 0.8 / max(len(present), 1)
            lows, highs = [], []
            for i, label in enumerate(present):
                rows = part.loc[label].reindex(groups)
                x = np.arange(len(groups)) + (i - (len(present) - 1) / 2) * step
                half = rows.ci95.where((rows.n_seeds >= 2) & (rows.ci95 > 0))  # no whisker without an interval
                lows += list((rows["mean"] - half.fillna(0)).dropna())
                highs += list((rows["mean"] + half.fillna(0)).dropna())
                axis.errorbar(x, rows["mean"], yerr=half.fillna(0), fmt=MARKERS[labels.index(label) % len(MARKERS)],
                              ms=3.5, lw=0, elinewidth=0.9, capsize=1.5, color=colors[label], zorder=3)  # fmt: skip
                counts = rows.n_seeds.dropna()
                text = label if label == base_label else seeds_label(label, counts if len(counts) else [1])
                legend.setdefault(label, (text, labels.index(label)))
            axis.set_ylabel(panel.ylabel)
            _limits(axis, panel, min(lows or [1.0]), max(highs or [1.0]))
            if panel.reference is not None:
                _reference(axis, panel.reference, panel.reference_label)
            known = {g: value for g, value in (chance or {}).items() if g in groups} if panel.chance else {}
            for g, value in known.items():
                axis.hlines(value, groups.index(g) - 0.45, groups.index(g) + 0.45, color="0.35", lw=0.8, ls=":", zorder=1)
            if known:
                axis.plot([], [], color="0.35", lw=0.8, ls=":", label="chance (1 / number of choices)")
        last = axes[-1, 0]
        last.set_xticks(np.arange(len(groups)))
        last.set_xticklabels([g.replace("_", "\n") if not rotate else g for g in groups], rotation=30 if rotate else 0,
                             ha="right" if rotate else "center")  # fmt: skip
        for axis in axes[:, 0]:
            axis.grid(axis="x", visible=False)
            axis.set_xlim(-0.5, len(groups) - 0.5)
        handles = [plt.Line2D([], [], marker=MARKERS[i % len(MARKERS)], ls="", color=colors[label], ms=3.5)
                   for label, (_, i) in sorted(legend.items(), key=lambda kv: kv[1][1])]  # fmt: skip
        names = [text for _, (text, _) in sorted(legend.items(), key=lambda kv: kv[1][1])]
        extra_handles, extra_names = axes[0, 0].get_legend_handles_labels()
        figure.legend(handles + extra_handles, names + extra_names, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=2, frameon=False, handletextpad=0.3, columnspacing=1.0)  # fmt: skip
        figure.suptitle(title, fontsize=7.5, y=1.0)
        figure.tight_layout(h_pad=0.6)
        return to_png(figure)


def curve_plot(curves: pd.DataFrame, terms: list[str], groups: list[str], title: str, columns: int = 3) -> bytes:
    """One panel per logged term against the optimizer step: per group (method, method at a learning rate) the mean
    over its runs as a line and, with two runs or more, the 95% t-interval as a band. `curves` has columns group,
    term, step, mean, ci95, n_runs."""
    with plt.rc_context(STYLE):
        columns = min(columns, len(terms))
        rows = -(-len(terms) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(2.35 * columns, 1.6 * rows + 0.5), squeeze=False)
        colors = dict(zip(groups, plt.get_cmap("tab10").colors))
        for axis, term in zip(axes.flat, terms):
            part = curves[curves.term == term]
            for group in groups:
                line = part[part.group == group].sort_values("step")
                if line.empty:
                    continue
                band = line.ci95.where(line.n_runs >= 2)
                if len(line) < 3:  # too few steps for a line and a band: points and whiskers
                    axis.errorbar(line.step, line["mean"], yerr=band.fillna(0), fmt="o", ms=2.5, capsize=1.5, color=colors[group])
                else:
                    axis.plot(line.step, line["mean"], color=colors[group])
                    axis.fill_between(line.step, line["mean"] - band, line["mean"] + band, color=colors[group], alpha=0.2, lw=0)
            axis.set_ylabel(term)
            axis.set_xlabel("optimizer step")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            if part.step.nunique() == 1:  # one logged step: integer ticks need a range around it
                axis.set_xlim(part.step.iloc[0] - 1, part.step.iloc[0] + 1)
        for axis in list(axes.flat)[len(terms) :]:
            axis.axis("off")
        runs = curves.groupby("group").n_runs.max()
        handles = [plt.Line2D([], [], color=colors[g]) for g in groups]
        names = [seeds_label(g, [runs.get(g, 1)], unit="run") for g in groups]
        figure.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(groups), 4), frameon=False)
        figure.suptitle(title, fontsize=7.5, y=1.0)
        figure.tight_layout(h_pad=0.8, w_pad=0.8)
        return to_png(figure)
