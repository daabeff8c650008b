"""Reports: tables and figures of preference accuracy and coherence over seeds, from reprpo-eval results
(`reprpo report`, reprpo_trl.cli.report; training curves of run directories: reprpo_trl.curves).

    reprpo report results/*.parquet --out reports/suite

For each method (results `label`) and shift: the per-seed value is the mean over the shift's datasets; the
table shows the mean over seeds ± the half-width of the 95% t-interval,
    mean ± t_{0.975, n-1} · s / sqrt(n)        (s: sample standard deviation over the n seeds)
with no interval for n = 1. Tables: absolute accuracy, gain over the base model in percentage points,
coherence (NLL of chosen completions relative to base; above 1 = less coherent). Rows of the `validation`
shift select models and never appear in a table. Writes report.md, summary.csv and shifts.png atomically; the
settings a report states (pairs per dataset, suite seed, datasets, seeds) are read from the results themselves.
Given reprpo-icl-eval results instead, it writes icl_report.md, icl_summary.csv and icl.png: accuracy without
and with demonstrations, calibration error and activation similarity, per method and task, over seeds.
Multiple-choice rows (reprpo-eval mc; shift "benchmark") get a method x benchmark section in the same report.md
(acc, acc_norm and gain over base, each seed's benchmark average in an `average` column; mc_summary.csv and
mc.png) and, beside preference rows, one table with both per method.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import InputError
from .eval import REPORTED_SHIFTS, add_coherence_ratio
from .eval.mc import MC_SHIFT, mc_chance
from .evaluate import BASE_LABEL
from .figures import Panel, interval_plot
from .icl.loading import icl_chance
from .io import atomic_write_bytes, atomic_write_text, read_table

METRICS = {  # name -> (column, scale, subtract base, title)
    "accuracy": ("acc", 1.0, False, "Preference accuracy"),
    "gain_pp": ("acc", 100.0, True, "Accuracy gain over base (pp)"),
    "nll_ratio": ("nll_ratio", 1.0, False, "Coherence: NLL(chosen) / NLL_base"),
}
ICL_METRICS = {  # reprpo-icl-eval results: one column per task
    "zs_acc": ("zs_acc", 1.0, False, "ICL task accuracy without demonstrations"),
    "icl_acc": ("icl_acc", 1.0, False, "ICL task accuracy with k demonstrations"),
    "zs_ece": ("zs_ece", 1.0, False, "Calibration error without demonstrations (ECE, 15 equal-mass bins)"),
    "act_cos_mean": ("act_cos_mean", 1.0, False, "Self-attention cosine to the base model with demonstrations"),
}
MC_METRICS = {  # reprpo-eval mc results: one column per benchmark, plus their average
    "mc_acc": ("acc", 1.0, False, "Benchmark accuracy (acc)"),
    "mc_gain_pp": ("acc", 100.0, True, "Benchmark accuracy gain over base (pp)"),
    "mc_acc_norm": ("acc_norm", 1.0, False, "Length-normalised benchmark accuracy (acc_norm, where the task defines it)"),
}
MC_AVERAGE = "average"
PANELS = {  # what each figure draws, one panel per metric
    "shifts": [Panel("accuracy", "preference accuracy", 0.5, "chance", ylim=(0, 1)),
               Panel("gain_pp", "gain over base (pp)", 0.0, "base", include_base=False),
               Panel("nll_ratio", "NLL(chosen) / NLL(base)", 1.0, "base", ratio=True, include_base=False)],
    "mc": [Panel("mc_acc", "accuracy (acc)", ylim=(0, 1), chance=True),
           Panel("mc_gain_pp", "gain over base (pp)", 0.0, "base", include_base=False)],
    "icl": [Panel("zs_acc", "accuracy, no demos", ylim=(0, 1), chance=True),
            Panel("icl_acc", "accuracy, k demos", ylim=(0, 1), chance=True),
            Panel("zs_ece", "ECE, no demos", ylim=(0, 1)),
            Panel("act_cos_mean", "attention-output cosine\nto base with demos", ylim=(-0.05, 1.05))],
}  # fmt: skip


RESULT_COLUMNS = {  # the command that writes a results table -> the columns a report reads from it
    "reprpo-eval": ["label", "shift", "dataset", "fingerprint", "acc", "nll_chosen"],
    "reprpo-eval mc": ["label", "shift", "dataset", "acc", "acc_norm"],
    "reprpo-icl-eval": ["label", "task", "k", "n", *(column for column, *_ in ICL_METRICS.values())],
}


def read_results(path, kind: str | None = None) -> pd.DataFrame:
    """A results table of reprpo-eval (preference or mc: they report together) or, when it has zs_acc,
    reprpo-icl-eval, checked for the columns a report reads; `kind` demands one kind."""
    table = read_table(path)
    found = "reprpo-icl-eval" if "zs_acc" in table else "reprpo-eval"
    if found == "reprpo-eval" and "shift" in table and table["shift"].eq(MC_SHIFT).all():
        found = "reprpo-eval mc"
    if kind is not None and found != kind and {found, kind} != {"reprpo-eval", "reprpo-eval mc"}:
        raise InputError(f"results file {str(path)!r} holds {found} results, the first file {kind} results; report "
                         "them separately")  # fmt: skip
    missing = [column for column in RESULT_COLUMNS[found] if column not in table]
    if missing:
        raise InputError(f"results file {str(path)!r} is not a {found} results table: it lacks column(s) {missing}; "
                         "give files written by reprpo-eval or reprpo-icl-eval")  # fmt: skip
    return table


def interval95(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n); the half-width is NaN for a single value."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float(values.mean()), float("nan"), n
    return float(values.mean()), float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)), n


def load_results(paths) -> pd.DataFrame:
    """Concatenate result files, drop repeated base rows, and make sure nll_ratio is there."""
    results = pd.concat([read_results(p, "reprpo-eval") for p in paths], ignore_index=True)
    identity = [c for c in ("label", "adapter", "seed", "learning_rate", "shift", "dataset", "fingerprint") if c in results]
    results = results.drop_duplicates(identity, keep="last")  # the same run evaluated twice counts once
    mc = results["shift"].eq(MC_SHIFT)  # benchmark rows have no coherence
    if mc.all():
        return results
    preference = add_coherence_ratio(results[~mc].drop(columns="nll_ratio", errors="ignore"), BASE_LABEL)
    return pd.concat([preference, results[mc]], ignore_index=True)


def summarize(results: pd.DataFrame, metrics: dict = METRICS, column: str = "shift") -> pd.DataFrame:
    """One row per (metric, label, column value): mean over seeds, 95% half-width and number of seeds; each
    seed's value is the mean over the datasets of that shift (`column`: "shift", or "task" for ICL results)."""
    reported = results[results[column].isin(REPORTED_SHIFTS)] if column == "shift" else results
    values = sorted({spec[0] for spec in metrics.values()})
    per_seed = reported.groupby(["label", "seed", column], sort=False, dropna=False)[values].mean().reset_index()
    base = per_seed[per_seed.label == BASE_LABEL].groupby(column)[values].mean()
    rows = []
    for metric, (value, scale, relative, _) in metrics.items():
        for (label, where), group in per_seed.groupby(["label", column], sort=False):
            if relative and label == BASE_LABEL:
                continue
            mean, half, n = interval95(scale * (group[value] - (base[value].get(where, np.nan) if relative else 0)))
            rows.append({"metric": metric, "label": label, "shift": where, "mean": mean, "ci95": half, "n_seeds": n})
    return pd.DataFrame(rows)


def _order(summary: pd.DataFrame) -> tuple[list[str], list[str]]:
    labels = list(dict.fromkeys(summary.label))
    labels = [BASE_LABEL] * (BASE_LABEL in labels) + [x for x in labels if x != BASE_LABEL]
    columns = list(dict.fromkeys(summary["shift"]))
    return labels, sorted(columns, key=lambda c: REPORTED_SHIFTS.index(c) if c in REPORTED_SHIFTS else len(REPORTED_SHIFTS))


def markdown_table(summary: pd.DataFrame, metric: str, digits: int) -> str:
    """label × shift, cells 'mean ± ci95'."""
    part = summary[summary.metric == metric]
    labels, shifts = _order(part)
    cell = part.set_index(["label", "shift"])
    table = pd.DataFrame(index=[x for x in labels if x in set(part.label)], columns=shifts)
    for (label, shift), row in cell.iterrows():
        half = "" if np.isnan(row.ci95) else f" ± {row.ci95:.{digits}f}"
        table.loc[label, shift] = f"{row['mean']:.{digits}f}{half}"
    return table.fillna("").rename_axis("method").to_markdown(disable_numparse=True)  # keep the digits asked for


def figure(summary: pd.DataFrame, panels: list[Panel], title: str, chance: dict[str, float] | None = None, width: float = 3.5) -> bytes:
    """The summary as an interval plot (reprpo_trl.figures): groups (shifts, benchmarks, tasks) in report order."""
    labels, groups = _order(summary)
    return interval_plot(summary, panels, groups, labels, title, BASE_LABEL, chance, width)


def counts(values) -> str:
    """'64' or '4–64': how many pairs (documents, examples) the results hold per dataset."""
    values = sorted({int(v) for v in values if pd.notna(v)})
    if not values:
        return "?"
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def evaluated_with(results: pd.DataFrame) -> str:
    """The evaluation settings the results record: pairs per dataset and the suite seed(s) that drew them."""
    seeds = sorted({int(v) for v in results.get("eval_seed", pd.Series(dtype=float)).dropna()})
    seed = f"; suite seed {', '.join(map(str, seeds))}" if seeds else ""
    return f"{counts(results['n'])} pairs per dataset{seed}" if "n" in results else f"pairs per dataset not recorded{seed}"


def mc_summary(results: pd.DataFrame) -> pd.DataFrame:
    """`summarize` of the benchmark rows per (label, benchmark), with each seed's mean over benchmarks as the
    benchmark `average` (acc_norm: over the benchmarks that define it); cells without a value are left out."""
    rows = results[results["shift"] == MC_SHIFT]
    average = rows.groupby(["label", "seed"], sort=False, dropna=False)[["acc", "acc_norm"]].mean().reset_index()
    rows = pd.concat([rows, average.assign(dataset=MC_AVERAGE)], ignore_index=True)
    return summarize(rows, MC_METRICS, column="dataset").dropna(subset=["mean"]).reset_index(drop=True)


def mc_section(results: pd.DataFrame, out_dir: Path) -> tuple[list[str], list[Path]]:
    """Markdown lines of the method x benchmark tables; writes mc.png and mc_summary.csv."""
    summary = mc_summary(results)
    rows = results[results["shift"] == MC_SHIFT]
    shots, n = sorted(set(rows.num_fewshot.astype(int))), sorted(set(rows.n.astype(int)))
    lines = ["## Multiple-choice benchmarks (lm-eval, log-likelihood of each choice)", "",
             f"Mean over seeds ± half-width of the 95% t-interval; few-shot k = {shots}; documents per benchmark: {n}. "
             f"`{MC_AVERAGE}`: each seed's mean over the benchmarks. Base = the model before training.", "",
             "![mc](mc.png)", ""]  # fmt: skip
    for metric, (*_, heading) in MC_METRICS.items():
        lines += [f"### {heading}", "", markdown_table(summary, metric, 1 if metric.endswith("pp") else 3), ""]
    groups = _order(summary)[1]
    title = f"Multiple-choice benchmarks: mean ± 95% t-interval over seeds\n{counts(rows.n)} documents per benchmark, k = {', '.join(map(str, shots))}"
    png = figure(summary, PANELS["mc"], title, mc_chance(groups), width=max(3.5, 0.42 * len(groups) + 1.0))
    atomic_write_bytes(out_dir / "mc.png", png)
    atomic_write_text(out_dir / "mc_summary.csv", summary.to_csv(index=False))
    return lines, [out_dir / "mc_summary.csv", out_dir / "mc.png"]


def side_by_side(summary: pd.DataFrame, benchmarks: pd.DataFrame) -> str:
    """label x (preference accuracy per shift, benchmark average accuracy): one run's two kinds of numbers."""
    both = pd.concat([summary[summary.metric == "accuracy"],
                      benchmarks[(benchmarks.metric == "mc_acc") & (benchmarks["shift"] == MC_AVERAGE)].assign(
                          metric="accuracy", shift=f"benchmarks ({MC_AVERAGE})")])  # fmt: skip
    return markdown_table(both, "accuracy", 3)


def write_report(results: pd.DataFrame, out_dir, title: str | None = None, notes: str = "") -> list[Path]:
    """report.md (tables + `notes`), summary.csv and shifts.png under `out_dir`; with benchmark rows also their
    section, mc_summary.csv and mc.png (benchmark rows alone: only those)."""
    out_dir = Path(out_dir)
    if not results["shift"].isin(REPORTED_SHIFTS).any():
        lines, paths = mc_section(results, out_dir)
        text = [f"# {title or 'Multiple-choice benchmarks'}", "", *lines, *([notes, ""] if notes else [])]
        atomic_write_text(out_dir / "report.md", "\n".join(text))
        return [out_dir / "report.md", *paths]
    title = title or "Preference accuracy across distribution shifts"
    summary = summarize(results)
    seeds = summary[summary.label != BASE_LABEL].n_seeds
    reported = results[results["shift"].isin(REPORTED_SHIFTS)]
    datasets = reported.groupby("shift", sort=False).dataset.unique()
    lines = [
        f"# {title}",
        "",
        f"Mean over seeds ± half-width of the 95% t-interval (seeds per method: {sorted(set(seeds)) or [1]}); "
        f"each seed's value is the mean over the shift's datasets; {evaluated_with(reported)} (as the results "
        "record them). Base = the model before training.",
        "",
        "Datasets: " + "; ".join(f"{shift}: {', '.join(map(str, sets))}" for shift, sets in datasets.items()),
        "",
        "![shifts](shifts.png)",
        "",
    ]
    for metric, (_, _, _, heading) in METRICS.items():
        digits = 1 if metric == "gain_pp" else 3
        lines += [f"## {heading}", "", markdown_table(summary, metric, digits), ""]
    mc_paths = []
    if results["shift"].eq(MC_SHIFT).any():
        mc_lines, mc_paths = mc_section(results, out_dir)
        lines += ["## Preference accuracy beside benchmark accuracy", "", side_by_side(summary, mc_summary(results)), "", *mc_lines]
    if notes:
        lines += [notes, ""]
    plot_title = (f"Preference accuracy across shifts: mean ± 95% t-interval over seeds\n"
                  f"{evaluated_with(reported)}; datasets per shift: see report")  # fmt: skip
    atomic_write_bytes(out_dir / "shifts.png", figure(summary, PANELS["shifts"], plot_title))
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return [out_dir / "report.md", out_dir / "summary.csv", out_dir / "shifts.png", *mc_paths]


def write_icl_report(results: pd.DataFrame, out_dir, title: str = "ICL accuracy without and with demonstrations") -> list[Path]:
    """icl_report.md, icl_summary.csv and icl.png under `out_dir`, from reprpo-icl-eval results."""
    out_dir = Path(out_dir)
    summary = summarize(results, ICL_METRICS, column="task")
    seeds = sorted(set(summary[summary.label != BASE_LABEL].n_seeds)) or [1]
    k, n = sorted(set(results.k.astype(int))), sorted(set(results.n.astype(int)))
    lines = [f"# {title}", "", f"Mean over seeds ± half-width of the 95% t-interval (seeds per method: {seeds}); "
             f"k = {k} demonstrations, {n} test examples per task. Base = the model before training.", "",
             "![icl](icl.png)", ""]  # fmt: skip
    for metric, (*_, heading) in ICL_METRICS.items():
        lines += [f"## {heading}", "", markdown_table(summary, metric, 3), ""]
    plot_title = f"ICL without and with demonstrations: mean ± 95% t-interval over seeds\nk = {k}, {counts(results.n)} test examples per task"
    atomic_write_bytes(out_dir / "icl.png", figure(summary, PANELS["icl"], plot_title, icl_chance(list(summary["shift"].unique()))))
    atomic_write_text(out_dir / "icl_summary.csv", summary.to_csv(index=False))
    atomic_write_text(out_dir / "icl_report.md", "\n".join(lines))
    return [out_dir / "icl_report.md", out_dir / "icl_summary.csv", out_dir / "icl.png"]
