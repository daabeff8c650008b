"""reprpo eval: preference accuracy and coherence of a base model and trained models across distribution shifts
(reprpo_trl.evaluate).

    reprpo eval --base embedded/SmolLM2-135M-Instruct --models outputs/dpo outputs/reprpo_prefvec \\
        --shifts pkg:shifts/suite.yaml --out results/eval

Each of --models is a peft adapter directory (loaded onto --base) or a full model directory; every one is checked
before anything is loaded or evaluated. Writes one row per (model, shift, dataset) to <out>.parquet and <out>.csv,
atomically, with provenance: label, method, recipe, seed and learning rate from the run record reprpo train
leaves, the code revisions of training and evaluation, the suite seed and each dataset's fingerprint.

`reprpo eval mc ...` scores the same models on multiple-choice benchmarks through lm-eval-harness instead
(`reprpo eval mc --help`).
"""

import argparse
import sys

from ..errors import command

EMBEDDED = "embedded/SmolLM2-135M-Instruct"  # reprpo_trl.models.EMBEDDED_MODEL (tested), without importing it
SUITE_SEED = 0  # reprpo_trl.data.SUITE_SEED (tested)
DTYPES = ["float32", "bfloat16", "float16"]


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--base, --models, --labels: what every evaluation command scores."""
    p.add_argument("--base", default=EMBEDDED, help="Base model: hub id, path or the embedded name.")
    p.add_argument("--models", nargs="*", default=[], help="Trained adapter or model directories.")
    p.add_argument("--labels", nargs="*", default=None, help="One label per --models entry (default: the run's method).")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--shifts", default="pkg:shifts/suite.yaml", help="Shift spec YAML (a file, or pkg:shifts/<name>.yaml).")
    p.add_argument("--out", required=True, help="Results path without suffix; .parquet and .csv are written.")
    p.add_argument("--n", type=int, default=200, help="Pairs per dataset (the first n).")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--suite_seed", "--seed", dest="suite_seed", type=int, default=SUITE_SEED,
                   help="Seed that draws generated (suite:...) datasets; the same default everywhere (reprpo train too).")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max_length", type=int, default=None, help="Truncate pairs to this many tokens.")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mc"]:
        from .eval_mc import main as mc_main

        return mc_main(argv[1:])
    args = parser().parse_args(argv)
    from ..evaluate import evaluate_models
    from ..io import write_table

    results = evaluate_models(
        args.base, args.models, args.shifts, n=args.n, batch_size=args.batch_size, seed=args.suite_seed,
        labels=args.labels, dtype=args.dtype, max_length=args.max_length,
    )  # fmt: skip
    paths = write_table(results, args.out)
    summary = results.groupby(["label", "shift"], sort=False)[["acc", "nll_ratio"]].mean().unstack("shift")
    print(summary.round(3).to_string())
    print("wrote", *paths)
