"""Atomic writes: a result file is either complete or absent, never half-written."""

import io
import os
import tempfile
from pathlib import Path

import pandas as pd


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


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A results table from .parquet or .csv."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise ValueError(f"results file {str(path)!r}: expected .parquet or .csv")
