"""reprpo report: tables and figures over seeds from result files, and training curves from run directories
(reprpo_trl.report, reprpo_trl.curves).

    reprpo report results/*.parquet --out reports/suite                 preference (and mc) results
    reprpo report results/icl.parquet --out reports/icl                 reprpo icl-eval results
    reprpo report outputs/sweep/runs/*/*/* --out reports/curves         training curves of runs
    reprpo report results/suite.parquet outputs/dpo_s* --out reports/x  both in one report

Result files: per method and shift the mean over seeds ± the half-width of the 95% t-interval (none for one
seed) of accuracy, gain over base and coherence; report.md, summary.csv, shifts.png (mc: mc.png; ICL:
icl_report.md, icl.png). Run directories (the output_dir of reprpo train, which keeps log_history.jsonl): every
logged term against the step, per method the mean over seeds ± the 95% t-interval; curves.md, curves.csv,
curves.png. Every setting a report states is read from the results and run records themselves.
"""

import argparse
from pathlib import Path

from ..errors import InputError, command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="Result files (.parquet/.csv of reprpo eval, eval mc or icl-eval) and/or run directories.")
    p.add_argument("--out", required=True, help="Directory for the report.")
    p.add_argument("--title", default=None, help="Report title (default: after what the results hold).")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from ..curves import is_run_dir, write_curves
    from ..report import load_results, read_results, write_icl_report, write_report

    runs = [path for path in args.inputs if Path(path).is_dir()]
    files = [path for path in args.inputs if not Path(path).is_dir()]
    for path in runs:
        if not is_run_dir(path):
            raise InputError(f"{path!r} is a directory but no training run: it has no log_history.jsonl (nor checkpoint "
                             "with a trainer_state.json); give the output_dir of a reprpo train run")  # fmt: skip
    paths = write_curves(runs, args.out) if runs else []
    notes = f"## Training curves\n\n{len(runs)} run(s); curves.md lists them.\n\n![curves](curves.png)" if runs else ""
    if files and "zs_acc" in read_results(files[0]):
        import pandas as pd

        paths += write_icl_report(pd.concat([read_results(p, "reprpo-icl-eval") for p in files], ignore_index=True), args.out)
    elif files:
        paths += write_report(load_results(files), args.out, args.title, notes=notes)
    for path in paths:
        print("wrote", path)
