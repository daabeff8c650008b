"""reprpo-icl-eval: ICL accuracy without and with demonstrations, uncertainty, calibration and activation
similarity of a base model and trained IA2 adapters (reprpo_trl.eval.icl).

    reprpo-icl-eval --base embedded/SmolLM2-135M-Instruct --models outputs/ia2_act_lora outputs/ia2_tok_lora \
        --task suite:sentiment --k 4 --n 200 --out results/icl_sentiment

Writes <out>.parquet and <out>.csv (one row per model, with provenance) atomically and prints a table;
`reprpo-report <out>.parquet [more seeds ...] --out DIR` turns result files into tables with intervals over
seeds and a plot. The examples come from the task's test split; demonstrations from its training pool, drawn
per example by --demo_seed.
"""

import argparse

import pandas as pd
import torch
from peft import PeftModel

from .eval.icl import evaluate_icl
from .errors import command
from .evaluate import check_models, each_model, load_base
from .icl import load_icl_task
from .io import write_table
from .provenance import code_revision

TABLE_COLUMNS = ["label", "zs_acc", "icl_acc", "icl_minus_zs_acc", "zs_top1", "zs_entropy", "zs_uncertainty", "zs_ece", "act_cos_mean"]


def evaluate_icl_models(base: str, models: list[str], task: str, k: int = 4, n: int = 200, demo_seed: int = 0,
                        labels: list[str] | None = None, batch_size: int = 16, dtype: str = "float32") -> pd.DataFrame:  # fmt: skip
    """One row per model (base first) of `evaluate_icl` on the test split of `task`."""
    check_models(base, models, labels)
    examples, pool = load_icl_task(task, "test", n=n)
    tokenizer, base_model = load_base(base, dtype)
    rows, revision = [], code_revision()
    for model, provenance in each_model(base_model, models, labels, dtype=dtype):
        reference = model if isinstance(model, PeftModel) else base_model
        with torch.no_grad():
            metrics = evaluate_icl(model, tokenizer, examples, pool, k=k, seed=demo_seed, batch_size=batch_size, base=reference)
        rows.append({**provenance, "task": task, "base_model": base, "demo_seed": demo_seed, **metrics,
                     "eval_git_revision": revision})  # fmt: skip
    return pd.DataFrame(rows)


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="reprpo-icl-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="embedded/SmolLM2-135M-Instruct")
    parser.add_argument("--models", nargs="*", default=[], help="Trained adapter or model directories.")
    parser.add_argument("--labels", nargs="*", default=None, help="One label per --models entry (default: the run's method).")
    parser.add_argument("--task", default="suite:sentiment", help="ICL task: suite:<task>, sst2, agnews, gsm8k, sciq or a file.")
    parser.add_argument("--k", type=int, default=4, help="Demonstrations in the with-demonstrations setting.")
    parser.add_argument("--n", type=int, default=200, help="Test examples.")
    parser.add_argument("--demo_seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", required=True, help="Results path without suffix.")
    args = parser.parse_args(argv)
    results = evaluate_icl_models(args.base, args.models, args.task, args.k, args.n, args.demo_seed, args.labels,
                                  args.batch_size, args.dtype)  # fmt: skip
    paths = write_table(results, args.out)
    print(results[[c for c in TABLE_COLUMNS if c in results]].set_index("label").to_markdown(floatfmt=".3f"))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
