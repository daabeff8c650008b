"""Training curves: every run keeps its log history on disk, and reports plot every logged term.

`LogHistoryCallback` (attached by `reprpo train` to every run) appends each log of the trainer (train logs: loss,
grad_norm, learning_rate, loss/*, hidden/*, rewards/*, logps/*, ...; eval logs: eval_*; shift evaluations: shift/*)
to <output_dir>/log_history.jsonl as it happens, one JSON object per line, so a run that stops early keeps what it
logged; on resume the file is first rewritten from the checkpoint's history, so it never holds steps the resumed
run redoes. A run directory without it (trained elsewhere) is read from its newest checkpoint's trainer_state.json.

`curve_summary` aggregates runs per group (the run record's method, and its learning rate where a method was run
at several): at each step the mean over the group's runs (seeds) and the half-width of the 95% t-interval,
    mean ± t_{0.975, n-1} · s / sqrt(n)        (n runs logging that step; no interval for n = 1)
and `write_curves` writes curves.png (one panel per term), curves.csv and curves.md.
"""

import json
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from .errors import InputError
from .figures import curve_plot
from .io import atomic_write_bytes, atomic_write_text
from .provenance import read_run_record
from .report import interval95

LOG_HISTORY = "log_history.jsonl"
NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
              "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}  # fmt: skip


class LogHistoryCallback(TrainerCallback):
    """Keep the trainer's log history in <output_dir>/log_history.jsonl (main process only)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed run starts from its checkpoint's history
            atomic_write_text(Path(args.output_dir) / LOG_HISTORY, "".join(json.dumps(row) + "\n" for row in state.log_history))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and state.log_history:
            with open(Path(args.output_dir) / LOG_HISTORY, "a") as f:
                f.write(json.dumps(state.log_history[-1]) + "\n")


def read_log_history(run_dir) -> pd.DataFrame:
    """One row per log of a run: log_history.jsonl (a half-written last line is skipped), else the log history of
    the newest checkpoint's trainer_state.json; empty when the run logged nothing."""
    run_dir = Path(run_dir)
    path = run_dir / LOG_HISTORY
    if path.exists():
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # only the last line can be incomplete (a run killed while writing)
                continue
        return pd.DataFrame(rows)
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    return pd.DataFrame(json.loads(states[-1].read_text())["log_history"]) if states else pd.DataFrame()


def is_run_dir(path) -> bool:
    """A training output directory whose curves can be read."""
    path = Path(path)
    return path.is_dir() and ((path / LOG_HISTORY).exists() or any(path.glob("checkpoint-*/trainer_state.json")))


def run_groups(run_dirs: list) -> dict[str, str]:
    """run dir -> group: the run record's method (else the directory name), with ", lr <lr>" where that method
    was run at several learning rates."""
    records = {str(d): read_run_record(d) for d in run_dirs}
    method = {d: r.get("method") or Path(d).name for d, r in records.items()}
    rates = {}
    for d, r in records.items():
        rates.setdefault(method[d], set()).add(r.get("learning_rate"))
    return {d: method[d] + (f", lr {records[d]['learning_rate']:g}" if len(rates[method[d]]) > 1 else "") for d in records}


def curve_summary(run_dirs: list) -> pd.DataFrame:
    """group, term, step, mean, ci95, n_runs: every numeric logged term of the runs, aggregated per group and step."""
    frames = []
    for run_dir, group in run_groups(run_dirs).items():
        history = read_log_history(run_dir)
        if history.empty or "step" not in history:
            continue
        terms = [c for c in history if c not in NOT_CURVES and pd.api.types.is_numeric_dtype(history[c])]
        long = history.melt(id_vars="step", value_vars=terms, var_name="term").dropna(subset=["value"])
        frames.append(long.assign(group=group, run=str(run_dir)))
    if not frames:
        return pd.DataFrame(columns=["group", "term", "step", "mean", "ci95", "n_runs"])
    values = pd.concat(frames, ignore_index=True).groupby(["group", "term", "step", "run"], sort=False).value.last()
    rows = []
    for (group, term, step), per_run in values.groupby(level=["group", "term", "step"], sort=False):
        mean, half, n = interval95(per_run.to_numpy())
        rows.append({"group": group, "term": term, "step": int(step), "mean": mean, "ci95": half, "n_runs": n})
    return pd.DataFrame(rows)


TERM_ORDER = ("loss", "loss/", "rewards/", "logps/", "logits/", "hidden/", "ia2/", "projgrad/", "", "eval_", "shift/")


def term_order(terms) -> list[str]:
    """The total loss first, then its terms and the trainer's metrics, everything else (grad_norm, learning_rate,
    ...), evaluation and shift-evaluation terms; alphabetically within each."""
    def kind(term: str) -> int:
        prefixed = [i for i, prefix in enumerate(TERM_ORDER) if prefix and (term == prefix or term.startswith(prefix))]
        return prefixed[0] if prefixed else TERM_ORDER.index("")

    return sorted(set(terms), key=lambda term: (kind(term), term))


def write_curves(run_dirs: list, out_dir, title: str = "Training curves") -> list[Path]:
    """curves.png, curves.csv and curves.md under `out_dir` from the logged history of `run_dirs`."""
    summary = curve_summary(run_dirs)
    if summary.empty:
        raise InputError(f"none of {[str(d) for d in run_dirs]} logged anything: train with logging_steps set (each run "
                         f"keeps its logs in {LOG_HISTORY})")  # fmt: skip
    out_dir = Path(out_dir)
    groups = list(dict.fromkeys(summary.group))
    terms = term_order(summary.term)
    runs = summary.groupby("group").n_runs.max()
    png = curve_plot(summary, terms, groups, f"{title}: mean over runs (seeds) ± 95% t-interval")
    atomic_write_bytes(out_dir / "curves.png", png)
    atomic_write_text(out_dir / "curves.csv", summary.to_csv(index=False))
    lines = [f"# {title}", "", "Every logged term against the optimizer step; per group the mean over its runs (seeds) and "
             "the half-width of the 95% t-interval (none for one run).", "",
             "| group | runs |", "|---|---|", *(f"| {g} | {int(runs[g])} |" for g in groups), "",
             f"Terms: {', '.join(f'`{t}`' for t in terms)}.", "", "![curves](curves.png)", ""]  # fmt: skip
    atomic_write_text(out_dir / "curves.md", "\n".join(lines))
    return [out_dir / "curves.md", out_dir / "curves.csv", out_dir / "curves.png"]
