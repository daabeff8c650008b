"""Preference datasets by spec, validated, with a truncation report.

A dataset spec is one string:
    suite:<family>:<split>            the offline suite (reprpo_trl.data.suite), e.g. suite:add_small:train
    path/to/file.{parquet,json,jsonl,csv}   a local file
    <hub id>[:<config>[:<split>]]     a hub dataset, e.g. wassname/genies_preferences:math:train; the split
                                      takes datasets' slicing, e.g. train[:90%]
Rows need `prompt`, `chosen` and `rejected`, as strings or as chat message lists.
"""

import os
from pathlib import Path

import datasets
from datasets import Dataset, load_dataset, load_from_disk

from .suite import make_family
from .tokenize import tokenize_pair

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
_FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_preference_dataset(spec: str, n: int | None = None, seed: int = 0) -> Dataset:
    """Load the dataset named by `spec`, keep the first `n` rows, and validate every row."""
    if spec.startswith("suite:"):
        _, family, split = (spec.split(":") + ["train"])[:3]
        dataset = make_family(family, split, n=n or 600, seed=seed)
    else:
        dataset = load_file_or_hub(spec, "preference dataset")
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    validate_preferences(dataset, spec)
    return dataset


def load_file_or_hub(spec: str, kind: str) -> Dataset:
    """A local .parquet/.json/.jsonl/.csv file, or `<hub id>[:config[:split]]` (split default train)."""
    if Path(spec).suffix in _FILE_FORMATS:
        if not Path(spec).exists():
            raise FileNotFoundError(f"{kind} file {spec!r} does not exist")
        return load_dataset(_FILE_FORMATS[Path(spec).suffix], data_files=spec, split="train")
    hub_id, config, split = (spec.split(":", 2) + [None, None])[:3]
    return load_dataset(hub_id, config or None, split=split or "train")


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(not str(m.get("content", "")).strip() for m in value)
    return True


def validate_preferences(dataset: Dataset, name: str) -> None:
    """Raise ValueError naming the dataset, row and field of the first malformed pair."""
    missing = [f for f in PREFERENCE_FIELDS if f not in dataset.column_names]
    if missing:
        raise ValueError(
            f"preference dataset {name!r} lacks column(s) {missing}; it has {dataset.column_names}. "
            "Rename its columns to prompt/chosen/rejected."
        )
    for i, row in enumerate(dataset.select_columns(list(PREFERENCE_FIELDS))):
        for field in PREFERENCE_FIELDS:
            if _is_empty(row[field]):
                raise ValueError(f"preference dataset {name!r} row {i}: field {field!r} is empty or not text")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"preference dataset {name!r} row {i}: chosen equals rejected, so there is no preference")


def truncated_fraction(dataset: Dataset, tokenizer, max_length: int | None) -> float:
    """Fraction of pairs whose prompt + chosen or prompt + rejected exceeds `max_length` tokens (for
    prompt/completion rows: prompt + completion + EOS)."""
    if max_length is None or len(dataset) == 0:
        return 0.0
    over = 0
    for row in dataset:
        if "completion" in row:
            over += len(tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]) > max_length
            continue
        ids = tokenize_pair(row, tokenizer)
        over += len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > max_length
    return over / len(dataset)


def check_truncation(dataset: Dataset, tokenizer, max_length: int | None, max_fraction: float, name: str) -> float:
    """Return the truncated fraction; raise if it is above `max_fraction`."""
    fraction = truncated_fraction(dataset, tokenizer, max_length)
    if fraction > max_fraction:
        raise ValueError(
            f"dataset {name!r}: {fraction:.1%} of {len(dataset)} pairs exceed max_length={max_length} tokens and would "
            f"be truncated (allowed: {max_fraction:.1%}). Raise max_length, filter long rows, or raise "
            "max_truncated_fraction."
        )
    return fraction


def on_disk(dataset: Dataset) -> Dataset:
    """The dataset backed by files under the datasets cache (saved there once, keyed by its fingerprint).

    An in-memory dataset writes the cache files of later `map` calls to a temporary directory of its own process,
    so under a multi-process launch the files one process writes are missing in the others (TRL's precomputed
    reference log-probs fail that way). Call it main process first; the others then load the saved copy.
    """
    if dataset.cache_files:
        return dataset
    path = Path(datasets.config.HF_DATASETS_CACHE) / "reprpo_trl" / dataset._fingerprint
    if not path.exists():
        partial = path.with_name(path.name + f".tmp{os.getpid()}")
        dataset.save_to_disk(str(partial))
        os.replace(partial, path)
    return load_from_disk(str(path))
