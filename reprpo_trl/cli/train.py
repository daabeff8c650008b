"""reprpo train: one training run from a YAML recipe, flags overriding the recipe (reprpo_trl.train).

    reprpo train --config recipes/reprpo_prefvec.yaml [--learning_rate 1e-4 ...]
    reprpo train --config pkg:dpo.yaml                      a recipe the package ships, from any directory
    reprpo train --config pkg:dpo.yaml --help               every flag of the recipe's trainer, the recipe's values as defaults
    accelerate launch --config_file accelerate_configs/ddp.yaml -m reprpo_trl.train --config ...

A refused run (bad input: one line, exit 2) leaves no output directory behind.
"""

import sys

from ..errors import command


@command
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from .help import print_help

        return print_help(argv)
    from ..errors import Stopped
    from ..io import removed_on_error
    from ..train import close_process_group, parse_args, run

    with removed_on_error(parse_args(argv)[1].output_dir):
        try:
            run(argv)
        except Stopped:  # every rank agreed on the step it stopped at
            close_process_group()
            raise
    close_process_group()
