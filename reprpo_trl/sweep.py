"""reprpo-sweep: train and evaluate a grid of methods × learning rates × seeds, select on validation, report.

    reprpo-sweep --config recipes/sweeps/suite_methods.yaml            # run what is missing, then report
    reprpo-sweep --config recipes/sweeps/suite_methods.yaml --emit     # one command per missing run (slurm arrays)
    reprpo-sweep --config recipes/sweeps/suite_methods.yaml --only dpo/lr0.0001/seed1

Every run of the grid is parsed as reprpo-train would parse it before the first one trains, so an unknown
trainer, key or value in any recipe fails at once. A run is finished when its eval.parquet exists (written
atomically after training, which leaves its run record last), so re-running skips finished runs and resumes after
any interruption. With several learning rates, the one of each method is chosen by mean accuracy over seeds on
the spec's `validation` shift, which is never reported; the report then shows the selected runs only and says
what was selected on which data. Without `learning_rates`, each method trains at its recipe's own learning rate
and nothing is selected.

Grid YAML keys: output_dir, methods (name -> training recipe), seeds, learning_rates (optional), train_overrides
(flags for every reprpo-train run), shifts (a shift spec with a `validation` shift; the preference evaluation),
eval_samples, eval_batch_size, eval_seed, and the multiple-choice evaluation through lm-eval (reprpo-eval mc):
mc_tasks, mc_include_path, mc_num_fewshot, mc_limit, mc_batch_size. A grid evaluates with shifts, mc_tasks or both.
"""

import argparse
import difflib
import gc
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import train
from .errors import InputError, command
from .eval import SELECTION_SHIFT, load_shift_spec
from .evaluate import BASE_LABEL, check_models, evaluate_models
from .io import read_yaml, write_table
from .provenance import RUN_RECORD
from .report import load_results, write_report


@dataclass
class Grid:
    output_dir: str
    methods: dict[str, str]
    seeds: list[int]
    learning_rates: list[float] = field(default_factory=list)
    shifts: str | None = None
    train_overrides: dict = field(default_factory=dict)
    eval_samples: int = 200
    eval_batch_size: int = 16
    eval_seed: int = 0
    mc_tasks: list[str] = field(default_factory=list)
    mc_include_path: list[str] = field(default_factory=list)
    mc_num_fewshot: int | None = None
    mc_limit: float | None = None
    mc_batch_size: int = 16
    config: str = ""


@dataclass
class Run:
    method: str
    recipe: str
    learning_rate: float
    seed: int
    dir: Path

    @property
    def id(self) -> str:
        return f"{self.method}/lr{self.learning_rate:g}/seed{self.seed}"

    @property
    def result(self) -> Path:
        return self.dir / "eval.parquet"


def load_grid(path: str) -> Grid:
    """Read a grid YAML; errors name the file and the key."""
    raw = read_yaml(path, "sweep grid")
    known = set(Grid.__dataclass_fields__) - {"config"}
    unknown = sorted(set(raw) - known)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InputError(f"sweep grid {path!r}: unknown key(s) {unknown}; {hint}known keys are {sorted(known)}")
    try:
        grid = Grid(**raw, config=str(path))
    except TypeError as error:
        raise InputError(f"sweep grid {path!r}: {error}") from None
    for key, kind in (("methods", dict), ("seeds", list), ("learning_rates", list), ("train_overrides", dict)):
        value = getattr(grid, key)
        if not isinstance(value, kind) or (not value and key not in ("train_overrides", "learning_rates")):
            raise InputError(f"sweep grid {path!r}: {key} must be a non-empty YAML {'mapping' if kind is dict else 'list'}")
    for name, recipe in grid.methods.items():
        if not Path(str(recipe)).is_file():
            raise InputError(f"sweep grid {path!r}: recipe {recipe!r} of method {name!r}: no such file")
    if grid.shifts is None and not grid.mc_tasks:
        raise InputError(f"sweep grid {path!r} evaluates nothing: give shifts (preference accuracy) and/or mc_tasks (lm-eval)")
    if grid.shifts is not None and SELECTION_SHIFT not in load_shift_spec(grid.shifts):
        raise InputError(f"sweep grid {path!r}: shift spec {grid.shifts!r} needs a {SELECTION_SHIFT!r} shift for model selection")
    try:
        grid.learning_rates = [float(lr) for lr in grid.learning_rates]
    except (TypeError, ValueError):
        raise InputError(f"sweep grid {path!r}: learning_rates {grid.learning_rates} must all be numbers") from None
    if grid.shifts is None and len(grid.learning_rates) > 1:
        raise InputError(f"sweep grid {path!r}: choosing among {len(grid.learning_rates)} learning_rates needs shifts with a "
                         f"{SELECTION_SHIFT!r} shift; benchmarks are reported, never used to select. Give shifts or one learning rate.")  # fmt: skip
    if not grid.learning_rates:
        for name, recipe in grid.methods.items():
            recipe_learning_rate(grid, recipe, name)
    if grid.mc_tasks:
        from .eval.mc import check_tasks, task_manager

        check_tasks(grid.mc_tasks, task_manager(grid.mc_include_path))
    return grid


def recipe_learning_rate(grid: Grid, recipe: str, name: str = "") -> float:
    """The learning rate a method trains at when the grid names none: train_overrides', else its recipe's."""
    value = grid.train_overrides.get("learning_rate", read_yaml(recipe, "recipe").get("learning_rate"))
    if value is None:
        raise InputError(f"sweep grid {grid.config!r}: recipe {recipe!r} of method {name!r} names no learning_rate; "
                         "set it there or give the grid learning_rates")  # fmt: skip
    return float(value)


def runs(grid: Grid) -> list[Run]:
    return [
        Run(method, recipe, lr, seed, Path(grid.output_dir) / "runs" / method / f"lr{lr:g}" / f"seed{seed}")
        for method, recipe in grid.methods.items()
        for lr in grid.learning_rates or [recipe_learning_rate(grid, recipe, method)]
        for seed in grid.seeds
    ]


def base_model(grid: Grid) -> str:
    """The model every recipe starts from (they must agree), after train_overrides."""
    names = {
        grid.train_overrides.get("model_name_or_path") or read_yaml(recipe, "recipe").get("model_name_or_path")
        for recipe in grid.methods.values()
    }
    if len(names) != 1 or None in names:
        raise InputError(f"sweep grid {grid.config!r}: the recipes start from different or no base models {names}; compare methods on one base")
    return names.pop()


def train_argv(grid: Grid, run: Run) -> list[str]:
    flags = {**grid.train_overrides, "seed": run.seed, "learning_rate": run.learning_rate, "output_dir": str(run.dir)}
    argv = ["--config", run.recipe]
    for key, value in flags.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def validate(grid: Grid) -> None:
    """Parse every run of the grid as reprpo-train will and check the base model, before anything trains."""
    check_models(base_model(grid), [])
    for run in runs(grid):
        try:
            train.parse_args(train_argv(grid, run))
        except InputError as error:
            raise InputError(f"sweep grid {grid.config!r}, method {run.method!r} ({run.recipe}): {error}") from error


def _evaluate(grid: Grid, models: list[str], labels: list[str], include_base: bool) -> pd.DataFrame:
    """Preference results on the grid's shifts and/or multiple-choice results on its mc_tasks, in one table."""
    tables = []
    if grid.shifts is not None:
        tables.append(evaluate_models(
            base_model(grid), models, load_shift_spec(grid.shifts), n=grid.eval_samples,
            batch_size=grid.eval_batch_size, seed=grid.eval_seed, labels=labels, include_base=include_base,
        ))  # fmt: skip
    if grid.mc_tasks:
        from .evaluate_mc import evaluate_mc_models

        tables.append(evaluate_mc_models(
            base_model(grid), models, grid.mc_tasks, num_fewshot=grid.mc_num_fewshot, limit=grid.mc_limit,
            batch_size=grid.mc_batch_size, labels=labels, include_path=grid.mc_include_path, include_base=include_base,
            seed=grid.eval_seed,
        ))  # fmt: skip
    return pd.concat(tables, ignore_index=True)


def run_one(grid: Grid, run: Run) -> None:
    """Train (unless its run record exists) and evaluate (unless its result exists) one run."""
    if run.result.exists():
        return
    if not (run.dir / RUN_RECORD).exists():
        train.run(train_argv(grid, run))
        gc.collect()
    write_table(_evaluate(grid, [str(run.dir)], [run.method], include_base=False), run.result)


def base_result(grid: Grid) -> Path:
    """The base model's results, evaluated once per sweep."""
    path = Path(grid.output_dir) / "base" / "eval.parquet"
    if not path.exists():
        write_table(_evaluate(grid, [], [], include_base=True), path)
    return path


def validation_accuracy(results: pd.DataFrame) -> pd.Series:
    """Mean accuracy over seeds and datasets on the validation shift, per (label, learning_rate)."""
    validation = results[(results["shift"] == SELECTION_SHIFT) & (results.label != BASE_LABEL)]
    return validation.groupby(["label", "learning_rate"]).acc.mean()


def select(scores: pd.Series) -> pd.DataFrame:
    """Per method, the learning rate with the best validation accuracy (ties: the smaller rate)."""
    best = scores.reset_index().sort_values(["label", "acc", "learning_rate"], ascending=[True, False, True])
    return best.groupby("label").head(1).rename(columns={"acc": "validation_acc"})


def selection_notes(grid: Grid, scores: pd.Series, selected: pd.DataFrame) -> str:
    datasets = ", ".join(load_shift_spec(grid.shifts)[SELECTION_SHIFT])
    lines = [
        "## Model selection",
        "",
        f"Learning rate per method chosen by mean accuracy over seeds on the `{SELECTION_SHIFT}` shift ({datasets}), "
        "which appears in no table above. Validation accuracy per learning rate:",
        "",
        scores.unstack("learning_rate").rename_axis("method").to_markdown(floatfmt=".3f"),
        "",
        "Selected: " + ", ".join(f"{r.label} → lr {r.learning_rate:g}" for r in selected.itertuples()) + ".",
        "",
        f"Grid: `{grid.config}`; seeds {grid.seeds}; {grid.eval_samples} pairs per dataset (eval seed {grid.eval_seed}).",
    ]
    return "\n".join(lines)


def report(grid: Grid) -> list[Path]:
    """Select on validation (when the grid has several learning rates) and write the report of the selected runs
    to <output_dir>/report/."""
    missing = [run.id for run in runs(grid) if not run.result.exists()]
    if missing:
        raise RuntimeError(f"sweep {grid.config!r}: {len(missing)} run(s) not finished, e.g. {missing[:3]}; run them first")
    results = load_results([base_result(grid), *(run.result for run in runs(grid))])
    if len(grid.learning_rates) < 2:
        rates = ", ".join(f"{run.method} → lr {run.learning_rate:g}" for run in runs(grid)[:: len(grid.seeds)])
        notes = f"## Runs\n\nNo selection: each method trains at one learning rate ({rates}). Grid: `{grid.config}`; seeds {grid.seeds}."
        return write_report(results, Path(grid.output_dir) / "report", notes=notes)
    scores = validation_accuracy(results)
    selected = select(scores)
    keep = results.label.eq(BASE_LABEL) | results.set_index(["label", "learning_rate"]).index.isin(
        list(selected[["label", "learning_rate"]].itertuples(index=False, name=None))
    )
    return write_report(results[keep], Path(grid.output_dir) / "report", notes=selection_notes(grid, scores, selected))


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="reprpo-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Sweep grid YAML (see recipes/sweeps/).")
    parser.add_argument("--only", help="Run just this run id (method/lr<lr>/seed<seed>), e.g. from a slurm array.")
    parser.add_argument("--emit", action="store_true", help="Print one command per unfinished run instead of running.")
    args = parser.parse_args(argv)
    grid = load_grid(args.config)
    validate(grid)
    todo = [run for run in runs(grid) if not run.result.exists()]
    if args.emit:
        for run in todo:
            print(shlex.join(["reprpo-sweep", "--config", args.config, "--only", run.id]))
        return
    if args.only:
        match = [run for run in runs(grid) if run.id == args.only]
        if not match:
            raise InputError(f"sweep {args.config!r} has no run {args.only!r}; ids look like {runs(grid)[0].id}")
        run_one(grid, match[0])
        return
    for i, run in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {run.id}")
        run_one(grid, run)
    for path in report(grid):
        print("wrote", path)


if __name__ == "__main__":
    main()
