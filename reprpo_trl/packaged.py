"""The recipes, shift specs and sweep grids that ship inside the package (reprpo_trl/recipes, package data; in a
source checkout a link to the repository's recipes/), named from any directory as `pkg:<path>`:

    pkg:dpo.yaml                           a training recipe
    pkg:shifts/suite.yaml                  a shift spec
    pkg:sweeps/suite_methods.yaml          a sweep grid (it names its recipes and shift spec relative to itself)
    pkg:peft_baselines/embedded_hira.yaml

`reprpo recipes list` prints them; `reprpo recipes copy NAME... --to DIR` copies them out for editing, together with
the packaged files they name, so that the relative paths inside them still hold.
"""

import shutil
from pathlib import Path

import yaml

from .errors import InputError

PREFIX = "pkg:"
ROOT = (Path(__file__).parent / "recipes").resolve()  # in a source checkout, a link to the repository's recipes/


def names() -> list[str]:
    """Every packaged YAML file, as the path after `pkg:`."""
    return sorted(path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*.yaml"))


def resolve(name: str) -> Path:
    """The packaged file `pkg:<path>` (or `<path>`) names."""
    relative = name.removeprefix(PREFIX)
    path = ROOT / relative
    if not path.is_file():
        raise InputError(f"{PREFIX}{relative}: the package ships no such file; `reprpo recipes list` lists them")
    return path


def hint(path: str) -> str:
    """For a path that does not exist: where the package ships a file of that name (`recipes/dpo.yaml` or
    `dpo.yaml` -> `pkg:dpo.yaml`), as a clause to append to the error, else ''."""
    relative = Path(path).as_posix().removeprefix("./")
    for candidate in (relative.removeprefix("recipes/"), Path(path).name):
        if candidate and not path.startswith(PREFIX) and (ROOT / candidate).is_file():
            return f"; the package ships it as {PREFIX}{candidate} (`reprpo recipes list` lists them)"
    return ""


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def references(path: Path) -> list[Path]:
    """The packaged YAML files that `path` names by a relative path (a grid's recipes and shift spec, a recipe's
    shift_eval spec), and the files those name in turn."""
    found, todo = [], [path]
    while todo:
        current = todo.pop()
        for value in _strings(yaml.safe_load(current.read_text()) or {}):
            target = (current.parent / value).resolve()
            if value.endswith((".yaml", ".yml")) and target.is_file() and target.is_relative_to(ROOT) and target not in found:
                found.append(target)
                todo.append(target)
    return found


def copy(requested: list[str], dest: str | Path, force: bool = False) -> list[Path]:
    """Copy packaged files (and what they reference) under `dest`, keeping their layout; refuse to overwrite a file
    that differs unless `force`."""
    sources = []
    for name in requested:
        path = resolve(name)
        for source in (path, *references(path)):
            if source not in sources:
                sources.append(source)
    targets = [Path(dest) / source.relative_to(ROOT) for source in sources]
    clashes = [str(t) for s, t in zip(sources, targets) if t.exists() and t.read_bytes() != s.read_bytes()]
    if clashes and not force:
        raise InputError(f"{', '.join(clashes)} exist(s) with other contents; pass --force to overwrite")
    for source, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return targets
