"""`reprpo train --help` in well under a second: the flags of each trainer, rendered from a snapshot of the real
parser (reprpo_trl.train.parser), so that help needs neither torch nor TRL (importing them takes seconds).

The snapshot (train_help.json, shipped with the package) carries a key: the versions of trl, transformers, peft
and accelerate, and the dataclass definitions (read with `ast`, not imported) of the files that define the flags.
Where the installed key differs, the real parser prints the help and its snapshot is cached under $REPRPO_CACHE
for the next time. `python -m reprpo_trl.cli.help` rewrites the shipped snapshot; the test suite checks that it is
current and renders exactly what the real parser prints.
"""

import argparse
import ast
import hashlib
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

from ..argv import flag_value, split_flag_values
from ..io import input_path

SNAPSHOT = Path(__file__).with_name("train_help.json")
PACKAGES = ("trl", "transformers", "peft", "accelerate")
FIELD_FILES = ("train.py", "adapters.py", "dynamics/callbacks.py", "dynamics/llc.py", "trainers/*.py")
TRAINERS = ("dpo", "reprpo", "projgrad", "projbp", "ia2", "sft")  # train.TRAINERS, without importing it (tested)
DEFAULT_TRAINER = "reprpo"
ACTIONS = {"_StoreAction": "store", "_StoreFalseAction": "store_false", "_StoreTrueAction": "store_true",
           "_StoreConstAction": "store_const"}  # fmt: skip


def key() -> str:
    """The versions of the packages whose fields become flags, and the dataclasses of the files that add ours."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(json.dumps({name: version(name) for name in PACKAGES}).encode())
    for pattern in FIELD_FILES:
        for path in sorted(root.glob(pattern)):
            classes = [node for node in ast.parse(path.read_text()).body
                       if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list)]  # fmt: skip
            digest.update(ast.dump(ast.Module(body=classes, type_ignores=[])).encode())
    return digest.hexdigest()[:16]


def _action(action: argparse.Action) -> dict:
    shown = lambda value: None if value is None else str(value)  # noqa: E731  (help prints str(default))
    return {"flags": action.option_strings, "dest": action.dest, "action": ACTIONS[type(action).__name__],
            "nargs": action.nargs, "const": shown(action.const), "default": shown(action.default),
            "choices": None if action.choices is None else [str(c) for c in action.choices], "help": action.help,
            "metavar": action.metavar, "required": action.required}  # fmt: skip


def snapshot() -> dict:
    """Every trainer's parser as data: its description and its flags, each flag stored once and named by index
    (most are shared; the real parsers, so this imports TRL)."""
    from ..train import parser

    actions, trainers = [], {}
    for name in TRAINERS:
        live = parser(name)
        specs = [_action(a) for a in live._actions if not isinstance(a, argparse._HelpAction)]
        for spec in specs:
            if spec not in actions:
                actions.append(spec)
        trainers[name] = {"prog": live.prog, "description": live.description, "actions": [actions.index(a) for a in specs]}
    return {"key": key(), "actions": actions, "trainers": trainers}


def load() -> dict:
    """The shipped snapshot if it is current, else the cached one of this installation, else a new one."""
    current = key()
    cache = Path(os.environ.get("REPRPO_CACHE", Path.home() / ".cache" / "reprpo_trl")) / "help" / f"{current}.json"
    for path in (SNAPSHOT, cache):
        if path.exists() and (data := json.loads(path.read_text()))["key"] == current:
            return data
    data = snapshot()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data))
    return data


def build(data: dict, trainer: str) -> argparse.ArgumentParser:
    """An argparse parser that prints what the real one of `trainer` prints (it parses nothing)."""
    spec = data["trainers"][trainer]
    parser = argparse.ArgumentParser(prog=spec["prog"], description=spec["description"],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    for a in (data["actions"][i] for i in spec["actions"]):
        shown = argparse.SUPPRESS if a["help"] == argparse.SUPPRESS else a["help"]  # argparse compares by identity
        options = {"dest": a["dest"], "default": a["default"], "help": shown, "required": a["required"]}
        if a["action"] == "store":
            options |= {"nargs": a["nargs"], "const": a["const"], "choices": a["choices"], "metavar": a["metavar"]}
        parser.add_argument(*a["flags"], action=a["action"], **options)
    return parser


def recipe_defaults(argv: list[str]) -> dict:
    """What a recipe given with --config sets, as the real parser shows it: its keys, and its adapter section as
    the adapter flags."""
    path = flag_value(argv, "--config")
    if path is None:
        return {}
    recipe = yaml.safe_load(Path(input_path(path)).read_text()) or {}
    section = recipe.pop("adapter", None)
    if isinstance(section, dict):
        recipe |= {("adapter" if k == "type" else f"adapter_{k}"): ",".join(map(str, v)) if isinstance(v, list) else v
                   for k, v in section.items()}  # fmt: skip
    return recipe


def print_help(argv: list[str]) -> None:
    """The help of the trainer that --trainer, else the recipe's `trainer`, else the default names."""
    argv = split_flag_values(argv)
    defaults = recipe_defaults(argv)
    trainer = flag_value(argv, "--trainer") or defaults.get("trainer", DEFAULT_TRAINER)
    if trainer not in TRAINERS:
        from ..errors import InputError

        raise InputError(f"trainer={trainer!r}: choose one of {sorted(TRAINERS)}")
    parser = build(load(), trainer)
    parser.set_defaults(**{k: str(v) for k, v in defaults.items() if k != "env"})
    parser.print_help()


if __name__ == "__main__":  # python -m reprpo_trl.cli.help: rewrite the shipped snapshot
    SNAPSHOT.write_text(json.dumps(snapshot(), separators=(",", ":")) + "\n")
    print(f"wrote {SNAPSHOT} ({SNAPSHOT.stat().st_size // 1024} KiB)", file=sys.stderr)
