"""Training phases as hidden states (docs/methods.md "Training dynamics"; Hu et al., "Latent State Models of Training
Dynamics"): a Gaussian HMM over each run's per-checkpoint weight statistics.

    z-score every feature within its run     x' = (x - mean_run) / sd_run     (0 where sd_run = 0)
    fit hmmlearn GaussianHMM, 1..max_states states, diag and/or full covariance, `restarts` seeded starts each
        on the train runs; keep the start with the best train log-likelihood
    select the number of states (and covariance type) with the lowest BIC on the train runs, among the eligible
        models: fewer free parameters than scalar train observations (rows x features; when none has, this is
        dropped) and, when there
        are test runs, a test log-likelihood at least that of the simplest model fitted (1 state, diag when fitted: no phases,
        independent features) -- a full covariance fitted to a few runs of collinear statistics can have a
        high train likelihood and BIC yet predict held-out runs far worse than no model of phases at all
    decode every run (Viterbi); states are renumbered by when they occur (0 = earliest on average)
    transitions: counts of observed s -> s' (s != s') over all runs, and for each the features whose
        standardised means change most, mu_s' - mu_s (in within-run standard deviations)
    detours: a least-squares fit of each run's convergence step on which states it visited (with an intercept;
        only states some but not all runs visit carry information); a positive coefficient is a state whose visit
        comes with later convergence
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import read_table
from .arguments import COVARIANCES
from .stats import BIAS_STATS, MATRIX_STATS

WEIGHT_FEATURES = MATRIX_STATS + BIAS_STATS


def load_runs(paths: list[str]) -> dict[str, pd.DataFrame]:
    """Run name -> its weight-statistics table sorted by step, without rows where the update is still zero (l2 = 0,
    e.g. after a first step at learning rate 0). A path is a run directory (its dynamics/weight_stats.parquet is
    read), a dynamics/ directory, or a .parquet/.csv table."""
    runs = {}
    for path in map(Path, paths):
        if path.is_dir():
            table_path = next((p for p in (path / "dynamics" / "weight_stats.parquet", path / "weight_stats.parquet") if p.exists()), None)  # fmt: skip
            if table_path is None:
                raise InputError(f"{path}: no dynamics/weight_stats.parquet; train with --weight_stats true or run `reprpo-dynamics stats`")  # fmt: skip
        else:
            table_path = path
        if not table_path.exists():
            raise InputError(f"{path}: no such file or directory")
        name = path.name if path.is_dir() else (path.parent.parent.name if path.parent.name == "dynamics" else path.stem)
        if name in runs:
            raise InputError(f"{path}: a second run named {name!r}; give each run its own directory name")
        table = read_table(table_path)
        if "l2" in table:  # an adapter's zero update before its first effective step: its ratios are undefined
            table = table[table.l2 != 0]
        runs[name] = table.sort_values("step").reset_index(drop=True)
    return runs


def feature_columns(runs: dict[str, pd.DataFrame], extra: tuple[str, ...] = ()) -> list[str]:
    """The weight statistics (and `extra` columns) that every row of every run has."""
    wanted = [c for c in WEIGHT_FEATURES if all(c in t for t in runs.values())] + list(extra)
    for column in extra:
        missing = [name for name, table in runs.items() if column not in table]
        if missing:
            raise InputError(f"feature {column!r} is missing from run(s) {missing}")
    usable = [c for c in wanted if all(t[c].notna().all() for t in runs.values())]
    if not usable:
        raise InputError(f"no feature is present in every row of every run (looked for {wanted})")
    return usable


def zscore(table: pd.DataFrame, features: list[str]) -> np.ndarray:
    """Each feature standardised within the run; a constant feature becomes 0."""
    values = table[features].to_numpy(dtype=float)
    sd = values.std(axis=0)
    return np.where(sd > 0, (values - values.mean(axis=0)) / np.where(sd > 0, sd, 1), 0.0)


def split_runs(names: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of whole runs: at least one train run, and one test run when there are two or more."""
    order = list(np.random.default_rng(seed).permutation(names))
    n_test = 0 if len(names) < 2 else min(len(names) - 1, max(1, round(test_fraction * len(names))))
    return sorted(order[n_test:]), sorted(order[:n_test])


def _stack(data: dict[str, np.ndarray], names: list[str]) -> tuple[np.ndarray, list[int]]:
    return np.concatenate([data[n] for n in names]), [len(data[n]) for n in names]


@dataclass
class Selection:
    table: pd.DataFrame  # one row per (covariance, n_states)
    models: dict  # (n_states, covariance) -> fitted GaussianHMM
    selected: tuple[int, str]


def fit_models(data: dict[str, np.ndarray], train: list[str], test: list[str], max_states: int = 8,
               covariances: tuple[str, ...] = COVARIANCES, restarts: int = 4, n_iter: int = 200, seed: int = 0) -> Selection:  # fmt: skip
    """GaussianHMMs with 1..max_states states per covariance type, best of `restarts` seeded starts by train
    log-likelihood; the table has train/test log-likelihood, AIC and BIC (on the train runs), free parameters."""
    try:
        from hmmlearn.hmm import GaussianHMM
    except ImportError as error:
        raise ImportError("the HMM needs hmmlearn: pip install 'reprpo_trl[dynamics]'") from error
    x_train, len_train = _stack(data, train)
    x_test, len_test = _stack(data, test) if test else (None, None)
    rows, models = [], {}
    for covariance in covariances:
        for n_states in range(1, max_states + 1):
            best = None
            for restart in range(restarts):
                model = GaussianHMM(n_components=n_states, covariance_type=covariance, n_iter=n_iter,
                                    random_state=seed + restart, min_covar=1e-3)  # fmt: skip
                try:
                    model.fit(x_train, len_train)
                    score = model.score(x_train, len_train)
                except ValueError:  # a state that lost every observation leaves a transmat_ row of zeros
                    continue
                if np.isfinite(score) and (best is None or score > best[0]):
                    best = (score, model)
            if best is None:
                continue
            score, model = best
            test_ll = model.score(x_test, len_test) if test else np.nan
            rows.append({
                "covariance": covariance, "n_states": n_states, "train_ll": score,
                "test_ll": test_ll, "test_ll_per_obs": test_ll / len(x_test) if test else np.nan,
                "aic": model.aic(x_train, len_train), "bic": model.bic(x_train, len_train),
                "n_params": int(sum(model._get_n_fit_scalars_per_param().values())), "converged": model.monitor_.converged,
            })  # fmt: skip
            models[(n_states, covariance)] = model
    table = pd.DataFrame(rows)
    if table.empty:
        raise InputError("no HMM could be fitted: every restart failed; give more checkpoints per run or fewer states")
    table["identifiable"] = table.n_params < x_train.size  # scalar observations, as hmmlearn counts them
    table["generalises"] = True
    if test:  # a model that predicts held-out runs worse than "no phases, independent features" has overfitted
        simplest = table.sort_values(["n_states", "covariance"]).iloc[0]
        table["generalises"] = table.test_ll >= simplest.test_ll
    eligible = table.identifiable & table.generalises
    candidates = table[eligible] if eligible.any() else table[table.generalises]
    best_row = candidates.sort_values(["bic", "n_states"]).iloc[0]
    return Selection(table, models, (int(best_row.n_states), str(best_row.covariance)))


def order_states(model, data: dict[str, np.ndarray]) -> None:
    """Renumber `model`'s states in place by mean relative time of occupancy (0 = earliest; unvisited last)."""
    n = model.n_components
    times = [[] for _ in range(n)]
    for values in data.values():
        states = model.predict(values)
        for t, s in enumerate(states):
            times[s].append(t / max(len(states) - 1, 1))
    key = [np.mean(t) if t else 2.0 + s for s, t in enumerate(times)]
    order = np.argsort(key, kind="stable")  # new index -> old state
    model.startprob_ = model.startprob_[order]
    model.transmat_ = model.transmat_[order][:, order]
    model.means_ = model.means_[order]
    model._covars_ = model._covars_[order]


def decode(model, runs: dict[str, pd.DataFrame], data: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per (run, step): the Viterbi state and the run's columns."""
    return pd.concat([runs[name].assign(run=name, state=model.predict(data[name])) for name in runs], ignore_index=True)


def transitions(states: pd.DataFrame, model, features: list[str], top: int = 3) -> pd.DataFrame:
    """Observed transitions s -> s' with counts and the change of standardised means mu_s' - mu_s per feature."""
    counts = {}
    for _, rows in states.groupby("run", sort=False):
        sequence = rows.sort_values("step").state.to_numpy()
        for a, b in zip(sequence[:-1], sequence[1:]):
            if a != b:
                counts[(int(a), int(b))] = counts.get((int(a), int(b)), 0) + 1
    rows = []
    for (a, b), count in sorted(counts.items()):
        delta = model.means_[b] - model.means_[a]
        ranked = np.argsort(-np.abs(delta))[:top]
        rows.append({"source": a, "target": b, "count": count,
                     "top_features": ", ".join(f"{features[i]} {delta[i]:+.2f}" for i in ranked),
                     **{f"delta_{f}": float(d) for f, d in zip(features, delta)}})  # fmt: skip
    return pd.DataFrame(rows, columns=["source", "target", "count", "top_features"] + [f"delta_{f}" for f in features])


def convergence_step(table: pd.DataFrame, metric: str = "loss", tolerance: float = 0.1, window: int = 3) -> float:
    """The first step from which the metric (rolling mean over `window` points) stays within `tolerance` of its
    total change |m_first - m_last| around its final value."""
    if metric not in table or table[metric].isna().all():
        raise InputError(f"convergence metric {metric!r} is missing; choose a column of the weight-statistics table")
    table = table.dropna(subset=[metric])
    curve = table[metric].rolling(window, min_periods=1).mean().to_numpy()
    steps = table.step.to_numpy()
    band = tolerance * abs(curve[0] - curve[-1])
    outside = np.flatnonzero(np.abs(curve - curve[-1]) > band)
    return float(steps[outside[-1] + 1] if len(outside) else steps[0])


def detours(states: pd.DataFrame, converged: dict[str, float], n_states: int) -> tuple[pd.DataFrame, dict]:
    """Least-squares fit: convergence step = b0 + sum_s c_s [run visited s], over the states some but not all runs
    visit. Returns (per-state table, fit summary with R^2 and whether it was determined)."""
    names = list(converged)
    visits = np.array([[int(s in set(states[states.run == n].state)) for s in range(n_states)] for n in names])
    informative = [s for s in range(n_states) if 0 < visits[:, s].sum() < len(names)]
    y = np.array([converged[n] for n in names])
    design = np.column_stack([np.ones(len(names))] + [visits[:, s] for s in informative])
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    fitted = design @ coefficients
    total = ((y - y.mean()) ** 2).sum()
    r2 = float(1 - ((y - fitted) ** 2).sum() / total) if total > 0 else float("nan")
    by_state = dict(zip(informative, coefficients[1:]))
    table = pd.DataFrame({
        "state": range(n_states), "runs_visiting": visits.sum(axis=0),
        "coefficient_steps": [by_state.get(s, np.nan) for s in range(n_states)],
    })  # fmt: skip
    summary = {"intercept": float(coefficients[0]), "r2": r2, "runs": len(names), "informative_states": len(informative),
               "determined": len(names) > len(informative) + 1}  # fmt: skip
    return table, summary
