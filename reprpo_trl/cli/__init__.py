"""reprpo: one command with subcommands, in the style of `trl dpo|sft|env` and `accelerate launch|config|env`.

    reprpo train     --config RECIPE [--key value ...]         train one run from a recipe
    reprpo eval      --models DIR... --out RESULTS             preference accuracy and coherence across shifts
    reprpo eval mc   --models DIR... --tasks T... --out R      multiple-choice benchmarks through lm-eval
    reprpo icl-eval  --models DIR... --task T --out RESULTS    ICL accuracy without and with demonstrations
    reprpo report    RESULTS... RUN_DIR... --out DIR           tables, figures and training curves
    reprpo sweep     --config GRID [--emit | --only ID]        methods x learning rates x seeds, resumable
    reprpo demo      --config RECIPE                           train, then base vs trained on the offline suite
    reprpo dynamics  stats|fit|llc|llc-check|example ...       weight statistics, HMM phases, LLC
    reprpo recipes   list | show NAME | copy NAME... --to DIR  the recipes, shift specs and grids the package ships
    reprpo models    path NAME | list                          where a model name is on disk (the embedded model)
    reprpo env                                                 versions and devices, for bug reports

`reprpo <command> --help` lists a command's flags. Each command is a module of reprpo_trl.cli, a thin layer that
parses the command line and calls the library (nothing in the library imports reprpo_trl.cli); the reprpo-train,
reprpo-eval, ... commands are the same entry points. Bad input prints one line, `error: ...`, and exits with 2
(--debug or REPRPO_DEBUG=1 shows the traceback).
"""

import difflib
import importlib
import sys

from ..errors import InputError, command

COMMANDS = {"train": "train", "eval": "eval", "icl-eval": "icl_eval", "report": "report", "sweep": "sweep",
            "demo": "demo", "dynamics": "dynamics", "recipes": "recipes", "models": "models", "env": "env"}  # fmt: skip


@command
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"reprpo_trl {version('reprpo_trl')}")
        return
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean `reprpo {close[0]}`? " if close else ""
        raise InputError(f"unknown command {argv[0]!r}; {hint}commands: {', '.join(COMMANDS)} (reprpo --help)")
    return importlib.import_module(f"{__name__}.{COMMANDS[argv[0]]}").main(argv[1:])
