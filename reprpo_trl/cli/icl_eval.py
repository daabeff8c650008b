"""reprpo icl-eval: ICL accuracy without and with demonstrations, uncertainty, calibration and activation
similarity of a base model and trained IA2 adapters (reprpo_trl.evaluate_icl).

    reprpo icl-eval --base embedded/SmolLM2-135M-Instruct --models outputs/ia2_act_lora outputs/ia2_tok_lora \\
        --task suite:sentiment --k 4 --n 200 --out results/icl_sentiment

Writes <out>.parquet and <out>.csv (one row per model, with provenance) atomically and prints a table;
`reprpo report <out>.parquet [more seeds ...] --out DIR` turns result files into tables with intervals over seeds
and a figure. The examples come from the task's test split; demonstrations from its training pool, drawn per
example by --demo_seed.
"""

import argparse

from ..errors import command
from .eval import DTYPES, SUITE_SEED, add_model_flags

TABLE_COLUMNS = ["label", "zs_acc", "icl_acc", "icl_minus_zs_acc", "zs_top1", "zs_entropy", "zs_uncertainty", "zs_ece", "act_cos_mean"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo icl-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--task", default="suite:sentiment", help="ICL task: suite:<task>, sst2, agnews, gsm8k, sciq or a file.")
    p.add_argument("--k", type=int, default=4, help="Demonstrations in the with-demonstrations setting.")
    p.add_argument("--n", type=int, default=200, help="Test examples.")
    p.add_argument("--demo_seed", type=int, default=0, help="Seed that draws each example's demonstrations.")
    p.add_argument("--suite_seed", type=int, default=SUITE_SEED, help="Seed that draws a generated (suite:...) task.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--out", required=True, help="Results path without suffix.")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from ..evaluate_icl import evaluate_icl_models
    from ..io import write_table

    results = evaluate_icl_models(args.base, args.models, args.task, args.k, args.n, args.demo_seed, args.labels,
                                  args.batch_size, args.dtype, args.suite_seed)  # fmt: skip
    paths = write_table(results, args.out)
    print(results[[c for c in TABLE_COLUMNS if c in results]].set_index("label").to_markdown(floatfmt=".3f"))
    print("wrote", *paths)
