"""Atomic writes: a result file is either complete or absent, never half-written, and has the permissions the
user's umask gives any new file; reading the user's YAML (or a `pkg:` file the package ships) and result tables
with errors that name the file; input paths written inside a YAML file resolve against that file's directory."""

import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import yaml

from . import packaged
from .errors import InputError


def umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or directory (0777) gets under the user's umask; temporary files and directories
    are created 0600 / 0700, so what is renamed into place gets this mode first."""
    return (0o777 if directory else 0o666) & ~umask()


def apply_user_mode(path: str | os.PathLike) -> None:
    """Give a file, or every file and directory under a directory, the mode the user's umask gives new ones:
    safetensors writes 0600 files (adapters, transforms, cached targets, the dequantized model)."""
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.exists() and not item.is_symlink():
            os.chmod(item, user_mode(directory=item.is_dir()))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, give it the user's permissions, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, user_mode())
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


def input_path(value: str, base_dir: str | os.PathLike | None = None) -> str:
    """Where an input path named inside a YAML file points: `pkg:<name>` is the file the package ships; a relative
    path is taken from `base_dir` (the YAML file's own directory) when given, so a recipe or grid means the same
    files from any working directory; an absolute path is itself."""
    value = str(value)
    if value.startswith(packaged.PREFIX):
        return str(packaged.resolve(value))
    if base_dir is None or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def yaml_dir(path: str | os.PathLike) -> Path:
    """The directory of a YAML file (a `pkg:` one too): where the relative input paths inside it start."""
    return Path(input_path(str(path))).absolute().parent


def read_yaml(path: str | os.PathLike, what: str) -> dict:
    """The YAML mapping in `path` (or the `pkg:` file the package ships; {} for an empty file); errors name `what`
    and the file, and point to the packaged copy of a file that is not where it was looked for."""
    try:
        text = Path(input_path(str(path))).read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"{what} {str(path)!r}: no such file{packaged.hint(str(path))}") from None
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
