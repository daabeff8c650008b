"""reprpo-dynamics fit: the HMM analysis of a set of runs (reprpo_trl.dynamics.hmm), written to one directory.

    model_selection.{parquet,csv,png}   test log-likelihood, AIC, BIC per (covariance, number of states)
    states.{parquet,csv}, states.png    every run's Viterbi state per step; its metric curve coloured by state
    transitions.{parquet,csv,png}       observed transitions, counts, feature changes; the transition graph
    detours.{parquet,csv}               convergence step regressed on visited states
    hmm.pkl                             the selected GaussianHMM (states renumbered by time)
    summary.md                          all of the above in words and tables
"""

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..io import atomic_write_bytes, atomic_write_text, write_table
from . import hmm
from .plots import plot_model_selection, plot_states, plot_transitions


@dataclass
class FitArguments:
    """Settings of `reprpo-dynamics fit`."""

    max_states: int = field(default=8, metadata={"help": "Fit 1..max_states hidden states."})
    covariance: str = field(default="both", metadata={"help": "GaussianHMM covariance: diag, full or both."})
    restarts: int = field(default=4, metadata={"help": "Seeded restarts per model; the best train likelihood is kept."})
    test_fraction: float = field(default=0.2, metadata={"help": "Fraction of runs held out for the test likelihood."})
    features: str = field(default="", metadata={"help": "Extra columns to model besides the weight statistics, comma-separated (e.g. loss)."})  # fmt: skip
    metric: str = field(default="loss", metadata={"help": "Curve plotted by state and used for the convergence step."})
    tolerance: float = field(default=0.1, metadata={"help": "Converged: within this fraction of the total change of the final value."})  # fmt: skip
    window: int = field(default=3, metadata={"help": "Rolling-mean window (checkpoints) over the metric before the convergence test."})  # fmt: skip
    seed: int = field(default=0, metadata={"help": "Seed of the run split and the restarts."})

    def __post_init__(self):
        if self.covariance not in (*hmm.COVARIANCES, "both"):
            raise InputError(f"covariance={self.covariance!r}: choose diag, full or both")
        if not 1 <= self.max_states <= 20:
            raise InputError(f"max_states={self.max_states} must lie in 1..20")
        if self.restarts < 1:
            raise InputError(f"restarts={self.restarts} must be >= 1")
        if self.window < 1:
            raise InputError(f"window={self.window} must be >= 1")
        if not 0 <= self.test_fraction < 1:
            raise InputError(f"test_fraction={self.test_fraction} must lie in [0, 1)")

    @property
    def covariances(self) -> tuple[str, ...]:
        return hmm.COVARIANCES if self.covariance == "both" else (self.covariance,)


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
