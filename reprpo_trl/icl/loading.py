"""ICL tasks by spec, as (examples, demonstration pool) with validated {query, answer, choices} rows.

    suite:<task>                    the offline ICL suite (reprpo_trl.icl.suite): sentiment, topic, arith
    sst2 | agnews | gsm8k | sciq    the hub datasets of the original research (ICL_SOURCES), converted to rows
    path/to/file.{parquet,json,jsonl,csv}   a local table with query and answer (and optionally choices) columns;
                                    query and answer are read as text even where they look like numbers

The pool is the last `pool_size` rows of the training data and never overlaps the examples.
"""

from dataclasses import dataclass
from typing import Callable

from datasets import Dataset, load_dataset

from ..data.loading import local_format, read_file
from ..data.suite import SUITE_SEED
from ..errors import InputError
from .suite import ICL_TASKS, make_icl_task

ICL_FIELDS = ("query", "answer")
AGNEWS_LABELS = ["world", "sports", "business", "science"]
SST2_LABELS = ["negative", "positive"]


@dataclass(frozen=True)
class IclSource:
    hub_id: str
    config: str | None
    test_split: str
    convert: Callable[[dict], tuple[str, str]]  # row -> (query, answer)
    choices: tuple[str, ...] = ()


ICL_SOURCES = {
    "sst2": IclSource("stanfordnlp/sst2", None, "validation",  # its test labels are hidden
                      lambda r: (f"Review: {r['sentence'].strip()}\nSentiment:", SST2_LABELS[r["label"]]), tuple(SST2_LABELS)),
    "agnews": IclSource("fancyzhx/ag_news", None, "test",
                        lambda r: (f"Text: {r['text'].strip()}\nTopic:", AGNEWS_LABELS[r["label"]]), tuple(AGNEWS_LABELS)),
    "gsm8k": IclSource("openai/gsm8k", "main", "test",
                       lambda r: (f"Q: {r['question'].strip()}\nA:", r["answer"].split("####")[-1].strip().replace(",", ""))),
    "sciq": IclSource("allenai/sciq", None, "test",
                      lambda r: (f"Question: {r['question'].strip()}\nAnswer:", r["correct_answer"].strip())),
}  # fmt: skip


def icl_chance(tasks: list[str]) -> dict[str, float]:
    """Chance accuracy (1 / number of labels) of the label-word tasks among `tasks` (suite:<task> or a hub source
    name); free-text tasks have none."""
    labels = {f"suite:{name}": words for name, (_, words) in ICL_TASKS.items()}
    labels |= {name: source.choices for name, source in ICL_SOURCES.items()}
    return {task: 1 / len(labels[task]) for task in tasks if labels.get(task)}


def _from_source(source: IclSource, split: str, hub_id: str | None) -> Dataset:
    raw = load_dataset(hub_id or source.hub_id, source.config, split=source.test_split if split == "test" else split)

    def convert(row):
        query, answer = source.convert(row)
        return {"query": query, "answer": answer, "choices": list(source.choices)}

    return raw.map(convert, remove_columns=raw.column_names, desc=f"ICL rows from {hub_id or source.hub_id}")


def validate_icl(dataset: Dataset, name: str) -> None:
    """Raise InputError naming the dataset, row and field of the first malformed row."""
    missing = [f for f in ICL_FIELDS if f not in dataset.column_names]
    if missing:
        raise InputError(f"ICL dataset {name!r} lacks column(s) {missing}; it has {dataset.column_names}")
    for i, row in enumerate(dataset):
        for field in ICL_FIELDS:
            if not isinstance(row[field], str) or not row[field].strip():
                raise InputError(f"ICL dataset {name!r} row {i}: field {field!r} is empty or not text")
        if row.get("choices") and row["answer"] not in row["choices"]:
            raise InputError(f"ICL dataset {name!r} row {i}: answer {row['answer']!r} is not one of choices {row['choices']}")


def load_icl_task(spec: str, split: str = "train", n: int | None = None, pool_size: int = 64, seed: int = SUITE_SEED,
                  hub_id: str | None = None) -> tuple[Dataset, Dataset]:  # fmt: skip
    """(examples, demonstration pool) of the task named by `spec`; `hub_id` points a hub source at another
    repository or a local copy laid out the same way."""
    if spec.startswith("suite:"):
        task = spec.split(":")[1]
        train = make_icl_task(task, "train", n=(n or 300) + pool_size if split == "train" else pool_size, seed=seed)
        test = make_icl_task(task, "test", n=n or 300, seed=seed) if split == "test" else None
    elif spec in ICL_SOURCES:
        train = _from_source(ICL_SOURCES[spec], "train", hub_id)
        test = _from_source(ICL_SOURCES[spec], "test", hub_id) if split == "test" else None
    elif local_format(spec) is not None:
        train, test = read_file(spec, ICL_FIELDS), None
    else:
        raise InputError(f"ICL task spec {spec!r}: use suite:<task>, one of {sorted(ICL_SOURCES)}, or a local file")
    if len(train) <= pool_size and test is None:
        raise InputError(f"ICL task {spec!r} has {len(train)} training rows, not more than pool_size={pool_size}; "
                         "give more rows or a smaller demo_pool_size")
    pool = train.select(range(len(train) - pool_size, len(train)))
    examples = test if test is not None else train.select(range(len(train) - pool_size))
    if n is not None:
        examples = examples.select(range(min(n, len(examples))))
    if len(examples) == 0:
        raise InputError(f"ICL dataset {spec!r} is empty" + (f" with n={n}" if n is not None else ""))
    validate_icl(examples, spec)
    validate_icl(pool, f"{spec} (demonstration pool)")
    return examples, pool
