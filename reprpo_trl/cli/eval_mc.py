"""reprpo eval mc: multiple-choice benchmark accuracy of a base model and trained models through lm-eval-harness
(reprpo_trl.evaluate_mc).

    reprpo eval mc --base EleutherAI/gpt-neo-1.3B --models outputs/peft_baselines/gpt_neo_1.3b_* --out results/mc
    reprpo eval mc --base embedded/SmolLM2-135M-Instruct --models outputs/dpo --tasks cs_suite --limit 50 --out results/mc

The base model is loaded once; each of --models (a peft adapter directory, or a full model directory) is attached
to it, scored and taken off again, in process through lm-eval's HFLM. Every task is scored by log-likelihood over
its choices (acc, and acc_norm where the task defines it). --tasks takes lm-eval task or group names (default: the
nine commonsense benchmarks of the PEFT-baselines study, which lm-eval downloads from the hub), the package's
offline tasks (cs_suite, cs_suite_instruct, cs_suite_<family>[_instruct]) and tasks in --include_path directories.
Writes <out>.parquet and <out>.csv atomically, one row per (model, task), with the provenance of the preference
evaluation; `reprpo report` turns them into a method x benchmark table with 95% intervals over seeds.
"""

import argparse

from ..errors import command
from .eval import DTYPES, EMBEDDED

COMMONSENSE_TASKS = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                     "commonsense_qa"]  # reprpo_trl.eval.mc.COMMONSENSE_TASKS (tested)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo eval mc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=EMBEDDED, help="Base model: hub id, path or the embedded name.")
    p.add_argument("--models", nargs="*", default=[], help="Trained adapter or model directories.")
    p.add_argument("--labels", nargs="*", default=None, help="One label per --models entry (default: the run's method).")
    p.add_argument("--tasks", nargs="+", default=list(COMMONSENSE_TASKS), help="lm-eval task or group names.")
    p.add_argument("--include_path", nargs="*", default=[], help="Directories of extra lm-eval task YAMLs.")
    p.add_argument("--num_fewshot", type=int, default=None, help="Few-shot examples per question (default: the task's own).")
    p.add_argument("--limit", type=float, default=None,
                   help="Score only the first N documents of each task (a fraction if < 1); for quick runs, not for reported numbers.")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="Seed of lm-eval's few-shot sampling and of its other random draws.")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--out", required=True, help="Results path without suffix; .parquet and .csv are written.")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    from ..evaluate_mc import evaluate_mc_models
    from ..io import write_table

    results = evaluate_mc_models(
        args.base, args.models, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
        labels=args.labels, dtype=args.dtype, include_path=args.include_path, seed=args.seed,
    )  # fmt: skip
    paths = write_table(results, args.out)
    print(results.pivot_table(index="label", columns="dataset", values="acc", sort=False).round(3).to_string())
    print("wrote", *paths)
