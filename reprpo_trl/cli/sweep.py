"""reprpo sweep: train and evaluate a grid of methods × learning rates × seeds, select on validation, report
(reprpo_trl.sweep: grid keys, run identity, code-revision policy).

    reprpo sweep --config recipes/sweeps/suite_methods.yaml           run what is missing, then report
    reprpo sweep --config pkg:sweeps/suite_methods.yaml --emit        one command per unfinished run (slurm arrays)
    reprpo sweep --config recipes/sweeps/suite_methods.yaml --only dpo/lr0.0001/seed1

Every run is parsed as reprpo train would parse it before the first one trains, and keyed by a hash of all its
settings: a changed recipe, override, data file or evaluation setting trains or evaluates again (the old results
stay on disk and out of the report). Finished runs are skipped, so a sweep resumes after any interruption.
"""

import argparse
import shlex

from ..errors import InputError, command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="Sweep grid YAML (a file, or pkg:sweeps/<name>.yaml).")
    p.add_argument("--only", help="Run just this run id (method/lr<lr>/seed<seed>), e.g. from a slurm array.")
    p.add_argument("--emit", action="store_true", help="Print one command per unfinished run instead of running.")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from ..sweep import load_grid, plan, report, run_one, unfinished

    grid = load_grid(args.config)
    runs = plan(grid)
    todo = unfinished(grid, runs)
    if args.emit:
        for run in todo:
            print(shlex.join(["reprpo", "sweep", "--config", args.config, "--only", run.id]))
        return
    if args.only:
        match = [run for run in runs if run.id == args.only]
        if not match:
            raise InputError(f"sweep {args.config!r} has no run {args.only!r}; ids look like {runs[0].id}")
        return run_one(grid, match[0])
    for i, run in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {run.id} ({run.dir})")
        run_one(grid, run)
    for path in report(grid, runs):
        print("wrote", path)
