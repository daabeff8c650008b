"""reprpo-eval mc: multiple-choice benchmark accuracy of a base model and trained models through lm-eval-harness.

    reprpo-eval mc --base EleutherAI/gpt-neo-1.3B --models outputs/peft_baselines/gpt_neo_1.3b_* --out results/mc
    reprpo-eval mc --base embedded/SmolLM2-135M-Instruct --models outputs/dpo --tasks cs_suite --limit 50 --out results/mc

The base model is loaded once; each of --models (a peft adapter directory, or a full model directory) is attached
to it, scored and taken off again (reprpo_trl.evaluate.each_model), in process through lm-eval's HFLM. Every
task is scored by log-likelihood over its choices (acc, and acc_norm where the task defines it). --tasks takes
lm-eval task or group names (default: the nine commonsense benchmarks of the PEFT-baselines study, which lm-eval
downloads from the hub), the package's offline tasks (cs_suite, cs_suite_instruct, cs_suite_<family>[_instruct])
and tasks in --include_path directories. Writes <out>.parquet and <out>.csv atomically, one row per (model, task),
with the provenance of the preference evaluation (label, method, adapter, recipe, seed, learning rate, code
revisions); `reprpo-report` turns them into a method x benchmark table with 95% intervals over seeds.
"""

import argparse

import pandas as pd

from .eval.mc import COMMONSENSE_TASKS, check_tasks, evaluate_mc, task_manager, wrap
from .evaluate import each_model, load_base
from .io import write_table
from .provenance import code_revision


def evaluate_mc_models(
    base: str,
    models: list[str] = (),
    tasks: list[str] = COMMONSENSE_TASKS,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    labels: list[str] | None = None,
    dtype: str = "float32",
    include_path: list[str] | None = None,
    include_base: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (model, task): the base model (label 'base') and each of `models`, with provenance."""
    manager = task_manager(include_path)
    check_tasks(list(tasks), manager)
    tokenizer, base_model = load_base(base, dtype)
    common = {"base_model": base, "eval_seed": seed, "limit": limit, "eval_git_revision": code_revision()}
    tables = []
    for model, provenance in each_model(base_model, list(models), labels, include_base, dtype):
        lm = wrap(model, tokenizer, batch_size=batch_size)
        tables.append(evaluate_mc(lm, tasks, manager, num_fewshot, limit, seed).assign(**provenance, **common))
    return pd.concat(tables, ignore_index=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="reprpo-eval mc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="embedded/SmolLM2-135M-Instruct", help="Base model: hub id, path or the embedded name.")
    parser.add_argument("--models", nargs="*", default=[], help="Trained adapter or model directories.")
    parser.add_argument("--labels", nargs="*", default=None, help="One label per --models entry (default: the run's method).")
    parser.add_argument("--tasks", nargs="+", default=list(COMMONSENSE_TASKS), help="lm-eval task or group names.")
    parser.add_argument("--include_path", nargs="*", default=[], help="Directories of extra lm-eval task YAMLs.")
    parser.add_argument("--num_fewshot", type=int, default=None, help="Few-shot examples per question (default: the task's own).")
    parser.add_argument("--limit", type=float, default=None,
                        help="Score only the first N documents of each task (a fraction if < 1); for quick runs, not for reported numbers.")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="Seed of lm-eval's few-shot sampling and of its other random draws.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", required=True, help="Results path without suffix; .parquet and .csv are written.")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results = evaluate_mc_models(
        args.base, args.models, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
        labels=args.labels, dtype=args.dtype, include_path=args.include_path, seed=args.seed,
    )  # fmt: skip
    paths = write_table(results, args.out)
    print(results.pivot_table(index="label", columns="dataset", values="acc", sort=False).round(3).to_string())
    print("wrote", *paths)


if __name__ == "__main__":
    main()
