"""reprpo dynamics: read training runs (reprpo_trl.dynamics; docs/methods.md "Training dynamics").

    reprpo dynamics stats CHECKPOINT... [--base MODEL] [--out TABLE]       weight statistics from saved checkpoints
    reprpo dynamics fit RUN... --out DIR [--max_states 8 --covariance both ...]   HMM of training phases
    reprpo dynamics llc CHECKPOINT... --config RECIPE [recipe and --llc_* flags] [--out DIR]   LLC per checkpoint
    reprpo dynamics llc-check [--d 2 4 8 16] [--llc_* flags]                the estimator on linear regression (LLC = d/2)
    reprpo dynamics example [--out DIR] [--img DIR] [--jobs 2] [--quick]     docs/dynamics.md's example, end to end

A RUN is a training output directory with dynamics/weight_stats.parquet (reprpo-train --weight_stats true) or such
a table itself. Bad input is reported as one line naming what to change (exit 2).
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from ..errors import command

DYNAMICS_DIR = "dynamics"  # reprpo_trl.dynamics.callbacks.DYNAMICS_DIR (tested), without importing torch


def _add_fields(parser: argparse.ArgumentParser, dataclass) -> None:
    for f in fields(dataclass):
        kind = f.type if f.type in (int, float, str) else float  # the only optional fields are floats
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata.get("help"))


def _dataclass_of(dataclass, namespace):
    return dataclass(**{f.name: getattr(namespace, f.name) for f in fields(dataclass)})


def _run_dir(checkpoint: Path) -> Path:
    """The training output directory of `output_dir/checkpoint-N`, else the checkpoint itself."""
    return checkpoint.parent if checkpoint.name.startswith("checkpoint-") else checkpoint


def stats(args) -> None:
    from ..dynamics.checkpoints import checkpoint_stats
    from ..io import write_table

    table = checkpoint_stats(args.checkpoints, args.base)
    out = Path(args.out) if args.out else _run_dir(Path(args.checkpoints[0])) / DYNAMICS_DIR / "weight_stats.parquet"
    print(f"wrote {', '.join(map(str, write_table(table, out)))}")


def fit(args) -> None:
    from ..dynamics.arguments import FitArguments
    from ..dynamics.phases import fit_runs

    result = fit_runs(args.runs, args.out, _dataclass_of(FitArguments, args))
    n_states, covariance = result["selected"]
    print(f"selected {n_states} states ({covariance} covariance); see {Path(args.out) / 'summary.md'}")


def llc(args, recipe_argv: list[str]) -> None:
    import pandas as pd

    from ..dynamics.checkpoints import checkpoint_llc
    from ..dynamics.plots import plot_llc
    from ..io import write_table
    from ..train import build_trainer, parse_args

    run_args, train_args, model_args, adapter_args = parse_args(recipe_argv)
    trainer = build_trainer(run_args, train_args, model_args, adapter_args)
    table, traces = checkpoint_llc(args.checkpoints, trainer, run_args)
    out = Path(args.out) if args.out else _run_dir(Path(args.checkpoints[0])) / DYNAMICS_DIR
    write_table(table, out / "llc")
    write_table(traces, out / "llc_traces")
    losses = table[["step", "loss"]] if "loss" in table else pd.DataFrame(columns=["step", "loss"])
    plot_llc({out.parent.name: (losses, table)}, out / "llc.png")
    print(table[["step", "llc_mean", "llc_std", "init_loss", "bounded"]].to_string(index=False))


def llc_check(args) -> None:
    import pandas as pd

    from ..dynamics.arguments import LLCArguments
    from ..dynamics.llc import linear_regression_llc
    from ..dynamics.plots import plot_traces
    from ..io import write_table

    settings = _dataclass_of(LLCArguments, args)
    rows, traces = [], {}
    for d in args.d:
        summary, trace = linear_regression_llc(d, settings, n=args.n)
        rows.append({"d": d, "expected": d / 2, **summary, "relative_error": summary["llc_mean"] / (d / 2) - 1})
        traces[f"d={d}"] = (trace, summary)
    table = pd.DataFrame(rows)
    print(table[["d", "expected", "llc_mean", "llc_std", "relative_error", "bounded", "drift"]].to_string(index=False))
    if args.out:
        write_table(table, Path(args.out) / "llc_check")
        plot_traces(traces, Path(args.out) / "llc_check.png", {f"d={d}": d / 2 for d in args.d})


def example(args) -> None:
    from ..dynamics.example import run_example

    run_example(args.out, args.img, quick=args.quick, jobs=args.jobs)


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; the flags of the settings dataclasses only on the subcommand `command` that takes them
    (importing them imports torch, which --help of the others does without)."""
    main = argparse.ArgumentParser(prog="reprpo dynamics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = main.add_subparsers(dest="command", required=True)

    p = commands.add_parser("stats", help="Weight statistics of saved checkpoints (peft adapters or full models).")
    p.add_argument("checkpoints", nargs="+", help="Checkpoint directories (any order; sorted by step).")
    p.add_argument("--base", help="Base model of adapter checkpoints (default: the adapter's base_model_name_or_path).")
    p.add_argument("--out", help="Table path (default: <run dir>/dynamics/weight_stats.parquet, + .csv).")

    p = commands.add_parser("fit", help="HMM of training phases over runs' weight statistics.")
    p.add_argument("runs", nargs="+", help="Run directories (with dynamics/weight_stats.parquet) or tables.")
    p.add_argument("--out", required=True, help="Directory for tables, figures and summary.md.")
    if command == "fit":
        from ..dynamics.arguments import FitArguments

        _add_fields(p, FitArguments)

    p = commands.add_parser("llc", help="LLC at saved checkpoints with the recipe's own loss (other flags: the recipe's).")
    p.add_argument("checkpoints", nargs="+", help="Checkpoint directories of a run of --config.")
    p.add_argument("--out", help="Directory (default: <run dir>/dynamics).")

    p = commands.add_parser("llc-check", help="The LLC estimator on linear regression, where the LLC is d/2.")
    p.add_argument("--d", type=int, nargs="+", default=[2, 4, 8, 16], help="Numbers of parameters.")
    p.add_argument("--n", type=int, default=1000, help="Samples.")
    p.add_argument("--out", help="Directory for llc_check.{parquet,csv,png}.")
    if command == "llc-check":
        from ..dynamics.arguments import LLCArguments

        _add_fields(p, LLCArguments)
    p.set_defaults(llc_epsilon=3e-4, llc_gamma=1.0, llc_chains=4, llc_draws=1000, llc_probe_size=1, llc_batch_size=1)

    p = commands.add_parser("example", help="DPO vs ReprPO-prefvec on the embedded model: runs, HMM, LLC, figures.")
    p.add_argument("--out", default="outputs/dynamics_example", help="Directory for the runs and the analysis.")
    p.add_argument("--img", default=None, help="Also copy the figures here (docs/img).")
    p.add_argument("--jobs", type=int, default=2, help="Runs trained at once, one thread each.")
    p.add_argument("--quick", action="store_true", help="A smoke-test size (2 seeds, few steps): checks the pipeline.")
    return main


@command
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    known, rest = parser(command).parse_known_args(argv)
    if known.command == "llc":
        return llc(known, rest)
    if rest:
        parser(command).error(f"unrecognized arguments: {' '.join(rest)}")
    {"stats": stats, "fit": fit, "llc-check": llc_check, "example": example}[known.command](known)
