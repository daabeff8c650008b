"""ICL accuracy without and with demonstrations, uncertainty, calibration and activation similarity of a base model
and trained IA2 adapters (the library of `reprpo icl-eval`, reprpo_trl.cli.icl_eval; metrics: reprpo_trl.eval.icl).
The examples come from the task's test split; demonstrations from its training pool, drawn per example by
`demo_seed`; generated (suite:...) tasks are drawn with `suite_seed`, the same default as everywhere.
"""

import pandas as pd
import torch
from peft import PeftModel

from .data import SUITE_SEED
from .eval.icl import evaluate_icl
from .evaluate import check_models, each_model, load_base
from .icl import load_icl_task
from .provenance import code_revision


def evaluate_icl_models(base: str, models: list[str], task: str, k: int = 4, n: int = 200, demo_seed: int = 0,
                        labels: list[str] | None = None, batch_size: int = 16, dtype: str = "float32",
                        suite_seed: int = SUITE_SEED) -> pd.DataFrame:  # fmt: skip
    """One row per model (base first) of `evaluate_icl` on the test split of `task`."""
    check_models(base, models, labels)
    examples, pool = load_icl_task(task, "test", n=n, seed=suite_seed)
    tokenizer, base_model = load_base(base, dtype)
    rows, revision = [], code_revision()
    for model, provenance in each_model(base_model, models, labels, dtype=dtype):
        reference = model if isinstance(model, PeftModel) else base_model
        with torch.no_grad():
            metrics = evaluate_icl(model, tokenizer, examples, pool, k=k, seed=demo_seed, batch_size=batch_size, base=reference)
        rows.append({**provenance, "task": task, "base_model": base, "demo_seed": demo_seed, "eval_seed": suite_seed, **metrics,
                     "eval_git_revision": revision})  # fmt: skip
    return pd.DataFrame(rows)
