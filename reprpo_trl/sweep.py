"""Sweeps (`reprpo sweep`, reprpo_trl.cli.sweep): train and evaluate a grid of methods × learning rates × seeds,
select on validation, report.

Grid YAML keys: output_dir, methods (name -> training recipe), seeds, learning_rates (optional), train_overrides
(flags for every reprpo train run), shifts (a shift spec with a `validation` shift; the preference evaluation),
eval_samples, eval_batch_size, eval_seed (the suite seed of the evaluation data), code_revision (record | match),
and the multiple-choice evaluation through lm-eval (reprpo eval mc): mc_tasks, mc_include_path, mc_num_fewshot,
mc_limit, mc_batch_size. A grid evaluates with shifts, mc_tasks or both. Recipes, shift specs and include paths
are named relative to the grid's own directory (or as pkg:<name>); output_dir relative to the working directory.

Identity. Every run of the grid is parsed as reprpo train parses it before the first one trains (so a bad recipe
fails at once), and keyed by the hash of its settings (reprpo_trl.provenance.run_settings: every setting of the
recipe after train_overrides, seed and learning rate, except where it writes and how it reports; local data by
content; the base model). It trains into runs/<method>/lr<lr>/seed<seed>-<hash>/, so a changed setting is a new
run, trained on the next sweep, and the old directory is left alone and reported as not part of the grid. Each
evaluation is keyed by the hash of its own settings (base model, shift spec with its datasets, eval_samples,
eval_seed, mc_tasks and their options; not the batch size, which changes no result beyond float rounding):
eval-<hash>.parquet in the run directory, base/eval-<hash>.parquet for the base model. A run directory whose run
record holds other settings than its name says is refused, naming the settings that differ.

Code revision (`code_revision`): `record` (default) keeps the revision in every run record and result row and
reuses finished runs under a later revision; the report lists the revisions its results come from. `match` makes
the revision part of every identity, so that a new commit trains and evaluates everything again.

Resuming: a run with its result is skipped, a run with its run record but no result is only evaluated. With
several learning rates, the one of each method is chosen by mean accuracy over seeds on the spec's `validation`
shift, which is never reported; the report then shows the selected runs only and says what was selected on which
data. Without `learning_rates`, each method trains at its recipe's own learning rate and nothing is selected. The
report states the settings it shows from the run records and results, never from the grid.
"""

import difflib
import gc
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import train
from .curves import write_curves
from .data.loading import data_identity
from .errors import InputError
from .eval import SELECTION_SHIFT, load_shift_spec
from .evaluate import BASE_LABEL, check_models, evaluate_models
from .io import input_path, read_yaml, write_table, yaml_dir
from .models import model_identity
from .provenance import RUN_RECORD, code_revision, read_run_record, run_settings, settings_hash
from .report import counts, load_results, write_report

CODE_POLICIES = ("record", "match")


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
    code_revision: str = "record"
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
    hash: str
    dir: Path
    settings: dict

    @property
    def id(self) -> str:
        return f"{self.method}/lr{self.learning_rate:g}/seed{self.seed}"


def load_grid(path: str) -> Grid:
    """Read a grid YAML; input paths resolved against its directory; errors name the file and the key."""
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
    for key, kind in (("methods", dict), ("seeds", list), ("learning_rates", list), ("train_overrides", dict), ("mc_include_path", list)):
        value = getattr(grid, key)
        if not isinstance(value, kind) or (not value and key in ("methods", "seeds")):
            raise InputError(f"sweep grid {path!r}: {key} must be a non-empty YAML {'mapping' if kind is dict else 'list'}")
    if grid.code_revision not in CODE_POLICIES:
        raise InputError(f"sweep grid {path!r}: code_revision {grid.code_revision!r}: choose one of {CODE_POLICIES}")
    here = yaml_dir(path)
    grid.methods = {name: input_path(str(recipe), here) for name, recipe in grid.methods.items()}
    grid.shifts = None if grid.shifts is None else input_path(grid.shifts, here)
    grid.mc_include_path = [input_path(str(p), here) for p in grid.mc_include_path]
    grid.train_overrides = {**grid.train_overrides, **train.resolve_inputs(grid.train_overrides, here)}
    for name, recipe in grid.methods.items():
        if not Path(recipe).is_file():
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


def recipe_model(recipe: str) -> str | None:
    """The model a recipe names (a local one resolved against the recipe's directory)."""
    values = read_yaml(recipe, "recipe")
    return train.resolve_inputs(values, yaml_dir(recipe)).get("model_name_or_path", values.get("model_name_or_path"))


def base_model(grid: Grid) -> str:
    """The model every recipe starts from (they must agree), after train_overrides."""
    names = {grid.train_overrides.get("model_name_or_path") or recipe_model(recipe) for recipe in grid.methods.values()}
    if len(names) != 1 or None in names:
        raise InputError(f"sweep grid {grid.config!r}: the recipes start from different or no base models {names}; compare methods on one base")
    return names.pop()


def train_argv(grid: Grid, recipe: str, seed: int, learning_rate: float, output_dir: str) -> list[str]:
    flags = {**grid.train_overrides, "seed": seed, "learning_rate": learning_rate, "output_dir": output_dir}
    argv = ["--config", recipe]
    for key, value in flags.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def _with_code(settings: dict, grid: Grid) -> dict:
    return {**settings, "code_revision": code_revision()} if grid.code_revision == "match" else settings


def plan(grid: Grid) -> list[Run]:
    """Every run of the grid, parsed as reprpo train will parse it (before anything trains), with its identity."""
    check_models(base_model(grid), [])
    planned = []
    for method, recipe in grid.methods.items():
        for lr in grid.learning_rates or [recipe_learning_rate(grid, recipe, method)]:
            for seed in grid.seeds:
                try:
                    settings = run_settings(*train.parse_args(train_argv(grid, recipe, seed, lr, grid.output_dir)))
                except InputError as error:
                    raise InputError(f"sweep grid {grid.config!r}, method {method!r} ({recipe}): {error}") from error
                digest = settings_hash(_with_code(settings, grid))
                run_dir = Path(grid.output_dir) / "runs" / method / f"lr{lr:g}" / f"seed{seed}-{digest}"
                planned.append(Run(method, recipe, lr, seed, digest, run_dir, settings))
    return planned


def eval_settings(grid: Grid) -> dict:
    """What an evaluation's results depend on: the base model, the data (shift spec with each dataset's content,
    eval_samples, eval_seed) and the benchmarks with their options."""
    settings = {"base_model": model_identity(base_model(grid)), "eval_samples": grid.eval_samples, "eval_seed": grid.eval_seed}
    if grid.shifts is not None:
        settings["shifts"] = {shift: [data_identity(d) for d in ds] for shift, ds in load_shift_spec(grid.shifts).items()}
    if grid.mc_tasks:
        settings |= {"mc_tasks": grid.mc_tasks, "mc_num_fewshot": grid.mc_num_fewshot, "mc_limit": grid.mc_limit,
                     "mc_include_path": [data_identity(p) for p in grid.mc_include_path]}  # fmt: skip
    return _with_code(settings, grid)


def result_path(directory: Path, grid: Grid) -> Path:
    return Path(directory) / f"eval-{settings_hash(eval_settings(grid))}.parquet"


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


def check_record(run: Run) -> None:
    """Refuse a run directory whose run record was written with other settings than the run now has."""
    record = read_run_record(run.dir)
    if record and record.get("settings_hash") != settings_hash(run.settings):
        old = record.get("settings", {})
        changed = sorted(k for k in set(old) | set(run.settings) if old.get(k) != run.settings.get(k))
        raise InputError(f"run {run.id}: {run.dir} holds a run trained with other settings (differing: {changed[:8]}); "
                         "remove that directory, or restore the settings it was trained with")  # fmt: skip


def run_one(grid: Grid, run: Run) -> None:
    """Train (unless its run record exists) and evaluate (unless its result exists) one run."""
    result = result_path(run.dir, grid)
    if result.exists():
        return
    check_record(run)
    if not (run.dir / RUN_RECORD).exists():
        train.run(train_argv(grid, run.recipe, run.seed, run.learning_rate, str(run.dir)))
        gc.collect()
    write_table(_evaluate(grid, [str(run.dir)], [run.method], include_base=False), result)


def base_result(grid: Grid) -> Path:
    """The base model's results, evaluated once per evaluation setting."""
    path = result_path(Path(grid.output_dir) / "base", grid)
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


def selection_notes(results: pd.DataFrame, scores: pd.Series, selected: pd.DataFrame) -> str:
    validation = results[results["shift"] == SELECTION_SHIFT]
    return "\n".join([
        "## Model selection",
        "",
        f"Learning rate per method chosen by mean accuracy over seeds on the `{SELECTION_SHIFT}` shift "
        f"({', '.join(validation.dataset.unique())}; {counts(validation.n)} pairs per dataset), which appears in no "
        "table above. Validation accuracy per learning rate:",
        "",
        scores.unstack("learning_rate").rename_axis("method").to_markdown(floatfmt=".3f"),
        "",
        "Selected: " + ", ".join(f"{r.label} → lr {r.learning_rate:g}" for r in selected.itertuples()) + ".",
    ])  # fmt: skip


def runs_notes(grid: Grid, runs: list[Run], planned: list[Run], results: pd.DataFrame) -> str:
    """What the reported runs are, read from their run records and results: per method and learning rate the seeds,
    training data, rows and steps; the code revisions; runs under output_dir that are not of this grid's settings."""
    groups = {}
    for run in runs:
        groups.setdefault((run.method, run.learning_rate), []).append(read_run_record(run.dir) | {"hash": run.hash})
    rows = []
    for (method, lr), records in groups.items():
        data = sorted({f"{r['train_dataset']} (suite seed {r.get('suite_seed')})" for r in records})
        rows.append(f"| {method} | {lr:g} | {', '.join(str(r['seed']) for r in records)} | {'; '.join(data)} | "
                    f"{counts([r.get('train_rows') for r in records])} | {counts([r.get('steps') for r in records])} | "
                    f"{', '.join(r['hash'] for r in records)} |")  # fmt: skip
    trained = pd.Series([r.get("git_revision") for records in groups.values() for r in records]).value_counts()
    evaluated = sorted(set(results.get("eval_git_revision", pd.Series(dtype=str)).dropna()))
    current = {run.dir.resolve() for run in planned}
    others = [d for d in Path(grid.output_dir, "runs").glob("*/*/seed*") if d.resolve() not in current]
    lines = ["## Runs", "", "As their run records say (`reprpo_run.json` in each run directory):", "",
             "| method | lr | seeds | training data | training rows | optimizer steps | settings hashes |", "|---|---|---|---|---|---|---|",
             *rows, "", "Code revisions: training " + ", ".join(f"`{rev}` ({n} runs)" for rev, n in trained.items())
             + "; evaluation " + ", ".join(f"`{rev}`" for rev in evaluated) + ".",
             f"Grid: `{grid.config}` (code_revision: {grid.code_revision})."]  # fmt: skip
    if others:
        lines.append(f"{len(others)} run director{'y' if len(others) == 1 else 'ies'} under {Path(grid.output_dir, 'runs')} "
                     "hold runs of other settings and are not in this report.")  # fmt: skip
    return "\n".join(lines)


def unfinished(grid: Grid, runs: list[Run]) -> list[Run]:
    return [run for run in runs if not result_path(run.dir, grid).exists()]


def report(grid: Grid, runs: list[Run]) -> list[Path]:
    """Select on validation (when the grid has several learning rates) and write the report of the selected runs,
    with their training curves, to <output_dir>/report/."""
    missing = [run.id for run in unfinished(grid, runs)]
    if missing:
        raise InputError(f"sweep {grid.config!r}: {len(missing)} run(s) not finished, e.g. {missing[:3]}; run them first")
    results = load_results([base_result(grid), *(result_path(run.dir, grid) for run in runs)])
    out = Path(grid.output_dir) / "report"
    if len(grid.learning_rates) < 2:
        reported, selection = runs, "No selection: each method trains at one learning rate (" + ", ".join(
            f"{run.method} → lr {run.learning_rate:g}" for run in runs[:: len(grid.seeds)]) + ")."  # fmt: skip
    else:
        scores = validation_accuracy(results)
        selected = select(scores)
        selection = selection_notes(results, scores, selected)
        chosen = set(selected[["label", "learning_rate"]].itertuples(index=False, name=None))
        results = results[results.label.eq(BASE_LABEL) | results.set_index(["label", "learning_rate"]).index.isin(list(chosen))]
        reported = [run for run in runs if (run.method, run.learning_rate) in chosen]
    curves = write_curves([run.dir for run in reported], out, title="Training curves of the reported runs")
    notes = "\n\n".join([selection, runs_notes(grid, reported, runs, results),
                         "## Training curves\n\nEvery logged term of the reported runs (curves.md).\n\n![curves](curves.png)"])  # fmt: skip
    return write_report(results, out, notes=notes) + curves
