"""Preference datasets by spec, validated, with a truncation report.

A dataset spec is one string:
    suite:<family>:<split>            the offline suite (reprpo_trl.data.suite), e.g. suite:add_small:train
    path/to/file.{parquet,json,jsonl,csv}   a local file
    <hub id>[:<config>[:<split>]]     a hub dataset, e.g. wassname/genies_preferences:math:train; the split
                                      takes datasets' slicing, e.g. train[:90%]
Rows need `prompt`, `chosen` and `rejected`, as strings or as chat message lists ({role, content} mappings).
Text fields of local files are read as text even where they look like numbers (" 37" stays " 37").
"""

import hashlib
import itertools
import os
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, Features, Json, LargeList, List, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from ..errors import InputError
from ..io import input_path
from ..models import looks_like_path
from .suite import SUITE_SEED, make_family
from .tokenize import tokenize_pair

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def local_format(spec: str) -> str | None:
    """The `datasets` builder that reads the local file `spec`, or None for a suite, hub or local directory spec
    (<dir>[:config[:split]]). Refuses a file path that does not exist and an existing file whose suffix no builder
    reads."""
    path = Path(spec)
    if spec.startswith("suite:") or Path(spec.split(":")[0]).is_dir():
        return None
    if path.is_file() and path.suffix not in FILE_FORMATS:
        raise InputError(f"dataset {spec!r}: cannot read {path.suffix or 'suffix-less'} files; the readable suffixes "
                         f"are {', '.join(FILE_FORMATS)}")  # fmt: skip
    if path.suffix in FILE_FORMATS or looks_like_path(spec.split(":")[0]):
        if not path.is_file():
            raise InputError(f"dataset {spec!r}: no such file")
        return FILE_FORMATS[path.suffix]
    return None


def resolve_spec(spec: str, base_dir) -> str:
    """A dataset spec written inside a YAML file, with its local file or directory taken from `base_dir` (the
    YAML's directory): a first part with a readable suffix, starting with ./ or ../, or naming an existing directory
    there. Suite and hub specs are unchanged."""
    first, colon, rest = spec.partition(":")
    if spec.startswith("suite:") or os.path.isabs(first):
        return spec
    if Path(first).suffix in FILE_FORMATS or first.startswith(("./", "../")) or (Path(base_dir) / first).is_dir():
        return input_path(first, base_dir) + colon + rest
    return spec


def data_identity(spec: str) -> str:
    """What a dataset spec's rows are, for a run's identity: the sha256 of a local file (of a local directory's
    files), else the spec itself (suite data are fixed by spec, n and seed; a hub dataset is taken as named)."""
    first = spec.split(":")[0]
    path = Path(first)
    if spec.startswith("suite:") or not path.exists():
        return spec
    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix() if path.is_dir() else ""
        digest.update(name.encode() + file.read_bytes())
    return f"{spec} sha256:{digest.hexdigest()[:16]}"


def _has_no_rows(path: str, builder: str) -> bool:
    """Nothing, an empty JSON list or a CSV header alone (where `datasets` raises StopIteration or a
    DatasetGenerationError), or a parquet file of zero rows."""
    if builder == "parquet":
        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not parquet at all: unreadable, which loading reports
            return False
    with open(path, errors="replace") as f:
        lines = list(itertools.islice(filter(None, map(str.strip, f)), 2))
    return lines in ([], ["[]"]) or (builder == "csv" and len(lines) == 1)


def _load_file(path: str, builder: str, features: Features | None = None) -> Dataset:
    if _has_no_rows(path, builder):
        raise InputError(f"dataset {path!r} is empty: the file has no rows")
    try:
        dataset = load_dataset(builder, data_files=path, split="train", features=features)
    except (ValueError, DatasetGenerationError) as error:
        cause = error.__cause__ or error
        raise InputError(f"dataset {path!r} cannot be read as {builder}: {type(cause).__name__}: {cause}") from error
    if len(dataset) == 0:
        raise InputError(f"dataset {path!r} is empty: the file has no rows")
    return dataset


def read_file(path: str, text_fields: tuple[str, ...]) -> Dataset:
    """The local table at `path`, with `text_fields` read as text unless they hold lists (chat messages).

    `datasets` infers column types: a CSV column of " 37" becomes int64, and a JSON column mixing text and numbers
    becomes a Json column whose text values are decoded as JSON (" 37" -> 37), so every row looks wrong. Such
    columns are read again as strings; in a mixed column, a row holding a list or mapping is refused by index."""
    builder = FILE_FORMATS[Path(path).suffix]
    dataset = _load_file(path, builder)
    features = dict(dataset.features)
    for name in text_fields:
        if name not in features or isinstance(features[name], (List, LargeList)):
            continue
        if isinstance(features[name], Json):
            for i, value in enumerate(dataset[name]):
                if isinstance(value, (list, dict)):
                    raise InputError(f"dataset {path!r} row {i}: field {name!r} is a {type(value).__name__} where "
                                     "other rows hold text; give every row text, or every row a list of messages")  # fmt: skip
        features[name] = Value("string")
    if features != dataset.features:
        dataset = _load_file(path, builder, Features(features))
    return dataset


def load_preference_dataset(spec: str, n: int | None = None, seed: int = SUITE_SEED) -> Dataset:
    """Load the dataset named by `spec`, keep the first `n` rows (all without `n`), and validate every row; `seed`
    draws the pairs of a suite spec."""
    builder = local_format(spec)
    if spec.startswith("suite:"):
        _, family, split = (spec.split(":") + ["train"])[:3]
        dataset = make_family(family, split, n=n, seed=seed)
    else:
        dataset = load_file_or_hub(spec, PREFERENCE_FIELDS)
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    if len(dataset) == 0:
        raise InputError(f"dataset {spec!r} is empty" + (f" with n={n}" if n is not None else ""))
    validate_preferences(dataset, spec)
    return dataset


def load_file_or_hub(spec: str, text_fields: tuple[str, ...]) -> Dataset:
    """A local .parquet/.json/.jsonl/.csv file (its `text_fields` read as text), or `<hub id>[:config[:split]]`
    (split default train)."""
    if local_format(spec) is not None:
        return read_file(spec, text_fields)
    hub_id, config, split = (spec.split(":", 2) + [None, None])[:3]
    return load_dataset(hub_id, config or None, split=split or "train")


def field_problem(value) -> str | None:
    """What is wrong with one prompt/chosen/rejected value, or None: it must be non-empty text, or a list of
    {role, content} messages with some content."""
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if not isinstance(value, list):
        return "has no value" if value is None else f"is a {type(value).__name__}, not text or a list of messages"
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {j} is a {type(message).__name__} ({message!r:.40}), not a {{role, content}} mapping"
        missing = [key for key in ("role", "content") if not isinstance(message.get(key), str)]
        if missing:
            return f"message {j} has no {' or '.join(map(repr, missing))}"
    return None if any(message["content"].strip() for message in value) else "has no message with content"


def validate_preferences(dataset: Dataset, name: str) -> None:
    """Raise InputError naming the dataset, row and field of the first malformed pair."""
    missing = [f for f in PREFERENCE_FIELDS if f not in dataset.column_names]
    if missing:
        raise InputError(
            f"preference dataset {name!r} lacks column(s) {missing}; it has {dataset.column_names}. "
            "Rename its columns to prompt/chosen/rejected."
        )
    for i, row in enumerate(dataset.select_columns(list(PREFERENCE_FIELDS))):
        for field in PREFERENCE_FIELDS:
            problem = field_problem(row[field])
            if problem:
                raise InputError(f"preference dataset {name!r} row {i}: field {field!r} {problem}; fix or drop the row")
        kinds = {field: "text" if isinstance(row[field], str) else "messages" for field in PREFERENCE_FIELDS}
        if len(set(kinds.values())) > 1:
            raise InputError(f"preference dataset {name!r} row {i}: fields mix text and messages ({kinds}); give "
                             "prompt, chosen and rejected in one format")  # fmt: skip
        if row["chosen"] == row["rejected"]:
            raise InputError(f"preference dataset {name!r} row {i}: chosen equals rejected, so there is no preference")


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
        raise InputError(
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
        try:
            os.replace(partial, path)
        except OSError:  # another process saved the same dataset first: keep its copy
            if not path.exists():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    return load_from_disk(str(path))
