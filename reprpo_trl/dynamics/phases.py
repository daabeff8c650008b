"""reprpo-dynamics fit: the HMM analysis of a set of runs (reprpo_trl.dynamics.hmm), written to one directory.

    model_selection.{parquet,csv,png}   test log-likelihood, AIC, BIC per (covariance, number of states)
    states.{parquet,csv}, states.png    every run's Viterbi state per step; its metric curve coloured by state
    transitions.{parquet,csv,png}       observed transitions, counts, feature changes; the transition graph
    detours.{parquet,csv}               convergence step regressed on visited states
    hmm.pkl                             the selected GaussianHMM (states renumbered by time)
    summary.md                          all of the above in words and tables
"""

import pickle
from pathlib import Path

import pandas as pd

from ..io import atomic_write_bytes, atomic_write_text, write_table
from . import hmm
from .arguments import FitArguments
from .plots import plot_model_selection, plot_states, plot_transitions


def _markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".3g")


def fit_runs(paths: list[str], out: str | Path, args: FitArguments) -> dict:
    """Fit, select, decode and explain; write everything under `out`; return the numbers summary.md reports."""
    out = Path(out)
    runs = hmm.load_runs(paths)
    extra = tuple(f.strip() for f in args.features.split(",") if f.strip())
    features = hmm.feature_columns(runs, extra)
    data = {name: hmm.zscore(table, features) for name, table in runs.items()}
    train, test = hmm.split_runs(list(runs), args.test_fraction, args.seed)
    selection = hmm.fit_models(data, train, test, args.max_states, args.covariances, args.restarts, seed=args.seed)
    n_states, covariance = selection.selected
    model = selection.models[selection.selected]
    hmm.order_states(model, data)
    states = hmm.decode(model, runs, data)
    moves = hmm.transitions(states, model, features)
    converged = {name: hmm.convergence_step(table, args.metric, args.tolerance, args.window) for name, table in runs.items()}
    detours, fit = hmm.detours(states, converged, n_states)

    write_table(selection.table, out / "model_selection")
    plot_model_selection(selection.table, selection.selected, out / "model_selection.png")
    write_table(states, out / "states")
    plot_states(states, args.metric, out / "states.png", n_states)
    write_table(moves, out / "transitions")
    occupancy = states.state.value_counts().to_dict()
    plot_transitions(moves, n_states, occupancy, out / "transitions.png")
    write_table(detours, out / "detours")
    atomic_write_bytes(out / "hmm.pkl", pickle.dumps(model))

    sequences = {name: _runs_of_states(rows.state.tolist()) for name, rows in states.groupby("run", sort=False)}
    lines = [
        "# HMM of training dynamics",
        "",
        f"{len(runs)} runs ({len(train)} train: {', '.join(train)}; {len(test)} test: {', '.join(test) or '-'}), "
        f"{len(states)} checkpoints; {len(features)} features, z-scored within each run: {', '.join(features)}.",
        "",
        f"**Selected: {n_states} states, {covariance} covariance** (lowest BIC on the train runs among the eligible "
        "models: fewer parameters than scalar train observations, test log-likelihood not below the simplest model's).",
        "",
        "## Model selection",
        "",
        _markdown(selection.table),
        "",
        "## State sequences (Viterbi; state: number of consecutive checkpoints)",
        "",
        *[f"- {name}: {seq}" for name, seq in sequences.items()],
        "",
        "## Observed transitions (features whose standardised means change most)",
        "",
        _markdown(moves[["source", "target", "count", "top_features"]]) if len(moves) else "No transitions: every run stays in one state.",
        "",
        f"## Convergence and detours ({args.metric}, rolling mean over {args.window}, within {args.tolerance:.0%} of its "
        "total change of its final value)",
        "",
        _markdown(pd.DataFrame({"run": list(converged), "convergence_step": list(converged.values())})),
        "",
        _markdown(detours),
        "",
        f"Intercept {fit['intercept']:.3g} steps, R² {fit['r2']:.3g}, {fit['informative_states']} informative states "
        f"over {fit['runs']} runs" + ("" if fit["determined"] else " — under-determined: read the coefficients as a hint only") + ".",
    ]  # fmt: skip
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return {"features": features, "train": train, "test": test, "selected": selection.selected, "states": states,
            "transitions": moves, "convergence": converged, "detours": detours, "fit": fit, "selection": selection.table}  # fmt: skip


def _runs_of_states(sequence: list[int]) -> str:
    """[0, 0, 1, 1, 1, 0] -> '0×2 → 1×3 → 0×1'."""
    parts, count = [], 1
    for previous, current in zip(sequence, sequence[1:] + [None]):
        if current == previous:
            count += 1
        else:
            parts.append(f"{previous}×{count}")
            count = 1
    return " → ".join(parts)
