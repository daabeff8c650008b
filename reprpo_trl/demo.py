"""The demo (`reprpo demo`, reprpo_trl.cli.demo): train one recipe, then compare base vs trained on the offline
suite's shifts, with the same suite seed as the recipe's training data (`suite_seed`, default 0).

Prints a table (accuracy per shift and dataset, base vs trained, and the NLL ratio trained/base of the
chosen completions as a coherence check) and writes it to <output_dir>/shift_eval.csv.
"""

from pathlib import Path

import pandas as pd

from .data import SUITE_SHIFTS
from .eval import add_coherence_ratio, evaluate_shifts, load_shifts
from .io import apply_user_mode, atomic_write_text, removed_on_error
from .train import build_trainer, parse_args


def compare(base: pd.DataFrame, trained: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side accuracy, gain in percentage points and coherence ratio, per (shift, dataset)."""
    table = base[["shift", "dataset", "n", "acc"]].rename(columns={"acc": "acc_base"})
    table["acc_trained"] = trained["acc"].to_numpy()
    table["gain_pp"] = 100 * (table.acc_trained - table.acc_base)
    both = pd.concat([base.assign(label="base"), trained.assign(label="trained")], ignore_index=True)
    table["nll_ratio"] = add_coherence_ratio(both).query("label == 'trained'").nll_ratio.to_numpy()
    return table


def run(train_argv: list[str], eval_samples: int = 120) -> pd.DataFrame:
    """Train the recipe (reprpo train's arguments), evaluate base and trained on the first `eval_samples` pairs of
    each dataset of SUITE_SHIFTS; return the comparison table."""
    run_args, train_args, model_args, adapter_args = parse_args(train_argv)
    with removed_on_error(train_args.output_dir):  # a refused recipe leaves no empty output_dir behind
        trainer = build_trainer(run_args, train_args, model_args, adapter_args)
    model, tokenizer = trainer.model, trainer.processing_class
    batch = train_args.per_device_eval_batch_size
    data = load_shifts(SUITE_SHIFTS, n=eval_samples, seed=run_args.suite_seed)
    print(f"Evaluating the base model on {sum(map(len, SUITE_SHIFTS.values()))} datasets ...")
    base = evaluate_shifts(model, tokenizer, data, batch_size=batch)
    trainer.train()
    trainer.save_model(train_args.output_dir)
    apply_user_mode(train_args.output_dir)
    print("Evaluating the trained model ...")
    trained = evaluate_shifts(model, tokenizer, data, batch_size=batch)
    table = compare(base, trained)
    atomic_write_text(Path(train_args.output_dir) / "shift_eval.csv", table.to_csv(index=False))
    print(f"\n{run_args.trainer} ({getattr(train_args, 'hidden_loss', 'dpo')}) vs base, {eval_samples} pairs per dataset "
          f"(suite seed {run_args.suite_seed}):")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return table
