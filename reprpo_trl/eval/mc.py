"""Multiple-choice benchmarks through lm-eval-harness, scored in process on a model already built.

lm-eval's `HFLM` wraps the model object (no reload): for every document and choice c_j it computes the
log-likelihood of the choice after the context, ll_j = sum_t log p(c_j,t | context, c_j,<t), and reports
    acc      = mean over documents of [argmax_j ll_j == gold]
    acc_norm = mean over documents of [argmax_j ll_j / len(c_j) == gold]   (len in characters; where the task defines it)
with lm-eval's standard errors. Tasks are lm-eval task names (its own registry, the package's offline
`cs_suite*` tasks in reprpo_trl/mc_tasks, and any --include_path directory of task YAMLs).

Result rows follow the preference results (reprpo_trl.eval.preference): shift = "benchmark", dataset = the
task name, fingerprint = task + few-shot + limit, so reprpo-report can put both in one report.
"""

from functools import lru_cache
from pathlib import Path

import pandas as pd

MC_SHIFT = "benchmark"
PACKAGE_TASKS = Path(__file__).resolve().parent.parent / "mc_tasks"
COMMONSENSE_TASKS = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                     "commonsense_qa")  # fmt: skip
SUITE_TASKS = tuple(f"cs_suite_{family}" for family in ("truefalse", "solution", "answer3", "ending4", "option2", "answer4", "answer5"))
MC_METRICS = ("acc", "acc_norm")
CHOICES = {  # answer options per document of the shipped tasks (ARC: most documents; a few have 3 or 5)
    "boolq": 2, "piqa": 2, "social_iqa": 3, "hellaswag": 4, "winogrande": 2, "arc_easy": 4, "arc_challenge": 4,
    "openbookqa": 4, "commonsense_qa": 5, "truefalse": 2, "solution": 2, "answer3": 3, "ending4": 4, "option2": 2,
    "answer4": 4, "answer5": 5,
}  # fmt: skip


def mc_chance(tasks: list[str]) -> dict[str, float]:
    """Chance accuracy 1 / choices of the tasks whose number of choices is known (the nine benchmarks and the
    package's cs_suite_<family>[_instruct] tasks); `average`: the mean over the others when all are known."""
    def family(task: str) -> str:
        return task.removeprefix("cs_suite_").removesuffix("_instruct")

    chance = {task: 1 / CHOICES[family(task)] for task in tasks if family(task) in CHOICES}
    others = [task for task in tasks if task != "average"]
    if "average" in tasks and others and all(task in chance for task in others):
        chance["average"] = sum(chance[task] for task in others) / len(others)
    return chance


def task_manager(include_path: list[str] | str | None = None):
    """lm-eval's TaskManager over its registry, the package's offline tasks and `include_path` directories."""
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in extra:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include_path {str(path)!r} is not a directory of lm-eval task YAMLs")
    return _task_manager(tuple(str(Path(p).resolve()) for p in extra))


@lru_cache(maxsize=8)
def _task_manager(extra: tuple[str, ...]):  # indexing lm-eval's registry takes seconds: once per process
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(PACKAGE_TASKS), *extra])


def check_tasks(tasks: list[str], manager) -> None:
    """Refuse unknown task names before any model runs, naming them and where tasks come from."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: use lm-eval task or group names (`lm_eval ls tasks`), the "
                         f"package's {list(SUITE_TASKS)}, or add a directory of task YAMLs with --include_path")  # fmt: skip


def wrap(model, tokenizer, batch_size: int = 16, max_length: int | None = None):
    """lm-eval's HFLM around a built model (a PeftModel too): no reload, scored where the model lives."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate_mc(lm, tasks: list[str], manager, num_fewshot: int | None = None, limit: int | float | None = None,
                seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """One row per leaf task: acc, acc_norm (NaN where the task has none), their standard errors and n."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)  # fmt: skip
    groups = set(out.get("groups", {}))
    rows = []
    for task, metrics in out["results"].items():
        if task in groups:
            continue
        shots = out["n-shot"].get(task, num_fewshot or 0)
        row = {"shift": MC_SHIFT, "dataset": task, "fingerprint": f"mc:{task}:k{shots}:limit{limit}",
               "n": out["n-samples"][task]["effective"], "num_fewshot": shots}  # fmt: skip
        for metric in MC_METRICS:
            row[metric] = metrics.get(f"{metric},none", float("nan"))
            stderr = metrics.get(f"{metric}_stderr,none", float("nan"))
            row[f"{metric}_stderr"] = float("nan") if stderr == "N/A" else stderr
        rows.append(row)
    return pd.DataFrame(rows)
