"""Multiple-choice benchmark accuracy of a base model and trained models through lm-eval-harness (the library of
`reprpo eval mc`, reprpo_trl.cli.eval_mc): the base model is loaded once; each trained model (a peft adapter or a
full model directory) is attached, scored in process through lm-eval's HFLM and taken off again
(reprpo_trl.evaluate.each_model). One row per (model, task) with the provenance of the preference evaluation.
"""

import pandas as pd

from .eval.mc import COMMONSENSE_TASKS, check_tasks, evaluate_mc, task_manager, wrap
from .evaluate import each_model, load_base
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
