"""Atomic writes: a result file is either complete or absent, never half-written; reading the user's YAML and
result tables with errors that name the file."""

import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import yaml

from .errors import InputError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> list[Path]:
    """Write `table` as <path>.parquet and <path>.csv (suffix of `path` ignored), each atomically."""
    stem = Path(path).with_suffix("")
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(stem.with_suffix(".parquet"), buffer.getvalue())
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    return [stem.with_suffix(".parquet"), stem.with_suffix(".csv")]


@contextmanager
def removed_on_error(directory: str | os.PathLike):
    """Run the block; if it fails, remove again the empty directories it created on the way to `directory`
    (the Trainer creates output_dir when it is constructed), so a refused run leaves nothing behind."""
    directory = Path(directory).absolute()
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        yield
    except BaseException:
        for d in created:  # deepest first; a directory something was written into stays, and so do its parents
            if d.is_dir() and any(d.iterdir()):
                break
            if d.is_dir():
                d.rmdir()
        raise


def read_yaml(path: str | os.PathLike, what: str) -> dict:
    """The YAML mapping in `path` ({} for an empty file); errors name `what` and the file."""
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"{what} {str(path)!r}: no such file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise InputError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise InputError(
            f"{what} {str(path)!r} is a YAML {type(data).__name__}; it must be a mapping of key: value lines"
        )
    return data or {}


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A results table from .parquet or .csv."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise InputError(f"results file {str(path)!r}: expected .parquet or .csv")
    if not path.is_file():
        raise InputError(f"results file {str(path)!r}: no such file")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
