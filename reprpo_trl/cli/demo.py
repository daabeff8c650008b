"""reprpo demo: train one recipe, then compare base vs trained on the offline suite's shifts (reprpo_trl.demo).

    reprpo demo --config recipes/demo.yaml [--eval_samples 120] [any reprpo train flag]

Prints a table (accuracy per shift and dataset, base vs trained, and the NLL ratio trained/base of the chosen
completions as a coherence check) and writes it to <output_dir>/shift_eval.csv. Every flag but --eval_samples is
reprpo train's (`reprpo train --config RECIPE --help` lists them).
"""

import sys

from ..argv import flag_value, split_flag_values
from ..errors import InputError, command


@command
def main(argv: list[str] | None = None) -> None:
    argv = split_flag_values(list(sys.argv[1:] if argv is None else argv))
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    eval_samples = flag_value(argv, "--eval_samples") or "120"
    if not eval_samples.isdigit() or int(eval_samples) < 1:
        raise InputError(f"--eval_samples {eval_samples}: give a positive number of pairs per dataset")
    if "--eval_samples" in argv:
        i = argv.index("--eval_samples")
        argv = argv[:i] + argv[i + 2 :]
    from ..demo import run

    run(argv, int(eval_samples))
