"""reprpo dynamics example: docs/dynamics.md's comparison of DPO and ReprPO-prefvec dynamics, end to end.

Trains pkg:dpo.yaml and pkg:reprpo_prefvec.yaml (LoRA on the embedded SmolLM2-135M-Instruct) for three seeds each
on a small slice of the offline suite (24 steps of 2 pairs; each seed draws its own pairs), recording weight
statistics every step and the LLC every 8;
fits the HMM over all six runs; writes tables, figures and example.md (numbers and timings) under `out`.
Runs go `jobs` at a time (default 2: a 2-core machine), one thread each. A finished run (its adapter saved) is not rerun.
"""

import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from ..io import atomic_write_text, read_table, write_table
from ..packaged import PREFIX
from .callbacks import DYNAMICS_DIR
from .llc import rediagnose
from .phases import FitArguments, fit_runs
from .plots import plot_llc, plot_weight_stats

RECIPES = {"DPO": "dpo.yaml", "ReprPO-prefvec": "reprpo_prefvec.yaml"}
COLORS = {"DPO": "tab:blue", "ReprPO-prefvec": "tab:orange"}
FIGURES = ("model_selection.png", "states.png", "transitions.png", "llc.png", "weight_stats.png")
SETTINGS = {  # shared by both methods: a small, CPU-sized slice of each recipe
    "max_train_samples": 48, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 24,
    "learning_rate": 3e-4, "warmup_steps": 2, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
    "gradient_checkpointing": "false", "use_cpu": "true", "dataloader_num_workers": 0,
    "weight_stats": "true", "weight_stats_steps": 1,
    "llc": "true", "llc_steps": 8, "llc_epsilon": 3e-4, "llc_nbeta": 100.0, "llc_gamma": 1000.0, "llc_chains": 2,
    "llc_draws": 4, "llc_probe_size": 8, "llc_batch_size": 4,
}  # fmt: skip
QUICK = {"max_steps": 4, "llc_steps": 2, "llc_draws": 2, "max_train_samples": 8}


def _argv(method: str, seed: int, run_dir: Path, quick: bool) -> list[str]:
    """The run's reprpo train arguments: the packaged recipe and SETTINGS; each seed also draws its own training
    pairs (suite_seed = seed), as when the example was first measured."""
    settings = {**SETTINGS, **(QUICK if quick else {}), "seed": seed, "suite_seed": seed, "output_dir": str(run_dir)}
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    return ["--config", f"{PREFIX}{RECIPES[method]}"] + flags


def _train(method: str, seed: int, run_dir: Path, quick: bool) -> None:
    if (run_dir / "adapter_model.safetensors").exists() and (run_dir / DYNAMICS_DIR / "llc.parquet").exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "w") as log:
        done = subprocess.run([sys.executable, "-m", "reprpo_trl.train", *_argv(method, seed, run_dir, quick)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{method} seed {seed} failed (exit {done.returncode}); see {run_dir.with_suffix('.log')}")


def _per_method(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """mean ± sd over seeds of `column`, per method and step."""
    stats = table.groupby(["method", "step"])[column].agg(["mean", "std"]).reset_index()
    stats["value"] = stats["mean"].map("{:.3g}".format) + " ± " + stats["std"].map("{:.2g}".format)
    return stats.pivot(index="step", columns="method", values="value").reset_index()


def run_example(out: str | Path, img: str | Path | None = None, quick: bool = False, jobs: int = 2) -> Path:
    out = Path(out)
    started, cpu_before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    seeds = (1, 2) if quick else (1, 2, 3)
    runs = {f"{method}_s{seed}": (method, seed) for method in RECIPES for seed in seeds}
    dirs = {name: out / "runs" / name.replace("-", "_") for name in runs}
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda name: _train(*runs[name], dirs[name], quick), runs))
    training = time.time() - started
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (cpu.ru_utime + cpu.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)

    result = fit_runs([str(d) for d in dirs.values()], out / "hmm", FitArguments(test_fraction=0.34, window=6, tolerance=0.2))
    label = {d.name: name for name, d in dirs.items()}
    method_of = {d.name: runs[name][0] for name, d in dirs.items()}
    states = result["states"].assign(method=lambda t: t.run.map(method_of))
    weights = pd.concat([read_table(d / DYNAMICS_DIR / "weight_stats.parquet").assign(run=d.name) for d in dirs.values()])
    weights = weights[weights.l2 != 0]  # the first step runs at warm-up learning rate 0: no update yet
    weights["method"] = weights.run.map(method_of)
    weights["dpo_loss"] = weights["loss/dpo"].fillna(weights["loss"]) if "loss/dpo" in weights else weights["loss"]
    llc = pd.concat([rediagnose(read_table(d / DYNAMICS_DIR / "llc.parquet"), read_table(d / DYNAMICS_DIR / "llc_traces.parquet"))
                     .assign(run=d.name) for d in dirs.values()])  # fmt: skip
    llc["method"] = llc.run.map(method_of)

    plot_llc({label[d.name]: (weights[weights.run == d.name][["step", "loss"]], llc[llc.run == d.name]) for d in dirs.values()},
             out / "llc.png", colors={label[d.name]: COLORS[method_of[d.name]] for d in dirs.values()})  # fmt: skip
    plot_weight_stats(weights, ("dpo_loss", "l2", "spectral", "code_sparsity", "computational_sparsity", "sv_var"),
                      out / "weight_stats.png", COLORS,
                      f"Weight statistics of the LoRA update, averaged over its {int(weights.n_matrices.iloc[0])} matrices")  # fmt: skip
    shutil.copy(out / "hmm" / "model_selection.png", out / "model_selection.png")
    shutil.copy(out / "hmm" / "states.png", out / "states.png")
    shutil.copy(out / "hmm" / "transitions.png", out / "transitions.png")

    occupancy = (states.groupby(["method", "state"]).size() / states.groupby("method").size()).unstack(fill_value=0)
    convergence = pd.DataFrame([{"run": label[n], "method": method_of[n], "convergence_step": s}
                                for n, s in result["convergence"].items()])  # fmt: skip
    last = weights.sort_values("step").groupby("run").tail(1)
    final = last.groupby("method")[["dpo_loss", "rewards/accuracies", "l2", "spectral", "code_sparsity", "computational_sparsity"]].agg(["mean", "std"])  # fmt: skip
    write_table(occupancy.reset_index(), out / "occupancy")
    write_table(llc, out / "llc")
    n_states, covariance = result["selected"]
    wall = time.time() - started
    lines = [
        "# Dynamics example: numbers", "",
        f"Wall time {wall / 60:.1f} min (training {training / 60:.1f} min in {jobs} parallel one-thread jobs), "
        f"child CPU time {cpu_seconds / 60:.1f} min; machine: {os.cpu_count()} cores as seen by Python.", "",
        f"HMM: {n_states} states, {covariance} covariance; features {', '.join(result['features'])}; "
        f"test runs {', '.join(label[n] for n in result['test'])}.", "",
        "## Fraction of checkpoints in each state", "", occupancy.to_markdown(floatfmt=".2f"), "",
        "## State sequences", "", (out / "hmm" / "summary.md").read_text().split("## State sequences")[1].split("## Observed")[0].strip(), "",
        "## Transitions", "", result["transitions"][["source", "target", "count", "top_features"]].to_markdown(index=False), "",
        "## Convergence step (loss, rolling mean over 6 checkpoints, within 20% of its total change of its final value)", "", convergence.to_markdown(index=False), "",
        "## Detours (convergence step ~ visited states)", "", result["detours"].to_markdown(index=False, floatfmt=".3g"),
        f"\nR² {result['fit']['r2']:.3g}, determined: {result['fit']['determined']}", "",
        "## LLC per step (mean ± sd over seeds)", "", _per_method(llc, "llc_mean").to_markdown(index=False), "",
        "## SGLD diagnostics", "", llc.groupby("method")[["bounded", "drift_z", "max_excess"]].agg(["mean", "min", "max"]).to_markdown(floatfmt=".3g"), "",
        "## Final checkpoint (mean, sd over seeds)", "", final.to_markdown(floatfmt=".3g"), "",
    ]  # fmt: skip
    atomic_write_text(out / "example.md", "\n".join(lines))
    if img is not None:
        Path(img).mkdir(parents=True, exist_ok=True)
        for figure in FIGURES:
            shutil.copy(out / figure, Path(img) / f"dynamics_{figure}")
    print(f"wrote {out / 'example.md'} ({wall / 60:.1f} min)")
    return out / "example.md"
