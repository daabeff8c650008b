"""reprpo-report: interval arithmetic, tables from hand-built results, the plot, and atomic writes."""

import os

import numpy as np
import pandas as pd
import pytest

from reprpo_trl import io as rio
from reprpo_trl.eval import add_coherence_ratio
from reprpo_trl.report import interval95, load_results, markdown_table, summarize, write_report


def test_interval95_hand_computed():
    mean, half, n = interval95([1.0, 2.0, 3.0])
    assert mean == 2.0 and n == 3
    assert half == pytest.approx(4.302652729911275 / np.sqrt(3))  # t_{0.975,2} * s / sqrt(n), s = 1
    mean, half, n = interval95([0.7])
    assert mean == 0.7 and np.isnan(half) and n == 1


def _results():
    rows = []
    for shift, dataset, base_acc in [("in_domain", "d1", 0.5), ("cross_domain", "d2", 0.6), ("cross_domain", "d3", 0.4), ("validation", "v", 0.5)]:
        rows.append({"label": "base", "seed": None, "shift": shift, "dataset": dataset, "fingerprint": dataset, "acc": base_acc, "nll_chosen": 2.0})
        for seed, delta in [(1, 0.1), (2, 0.3)]:
            rows.append({"label": "dpo", "seed": seed, "shift": shift, "dataset": dataset, "fingerprint": dataset,
                         "acc": base_acc + delta, "nll_chosen": 2.0 * (1 + delta)})  # fmt: skip
    return pd.DataFrame(rows)


def test_summary_means_gains_and_intervals(tmp_path):
    path = tmp_path / "r.parquet"
    _results().to_parquet(path)
    results = load_results([path, path])  # repeated files add nothing
    summary = summarize(results).set_index(["metric", "label", "shift"])
    assert "validation" not in summary.index.get_level_values("shift")
    # cross_domain per seed = mean over d2, d3 = 0.5 + delta
    row = summary.loc[("accuracy", "dpo", "cross_domain")]
    assert row["mean"] == pytest.approx(0.7) and row.n_seeds == 2
    assert row.ci95 == pytest.approx(12.706204736174698 * np.std([0.6, 0.8], ddof=1) / np.sqrt(2))
    assert summary.loc[("gain_pp", "dpo", "in_domain")]["mean"] == pytest.approx(20.0)
    assert summary.loc[("nll_ratio", "dpo", "in_domain")]["mean"] == pytest.approx(1.2)
    assert ("gain_pp", "base", "in_domain") not in summary.index
    assert np.isnan(summary.loc[("accuracy", "base", "in_domain")].ci95)
    table = markdown_table(summarize(results), "accuracy", 3)
    lines = table.splitlines()
    assert lines[0].split() == ["|", "method", "|", "in_domain", "|", "cross_domain", "|"]
    assert lines[2].split("|")[1:3] == [" base     ", " 0.500         "] and "0.700 ± 1.271" in lines[3]


def test_write_report_files(tmp_path):
    paths = write_report(add_coherence_ratio(_results()), tmp_path / "rep", notes="## Model selection\nselected lr 1e-4")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Accuracy gain over base (pp)" in text and "Model selection" in text and "validation" not in text.split("## Model")[0]
    assert (tmp_path / "rep" / "shifts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths) == 3 and not [p for p in os.listdir(tmp_path / "rep") if p.startswith(".")]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.parquet"
    target.write_bytes(b"old")
    real_fdopen = os.fdopen

    class Breaks:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError("disk full")

    monkeypatch.setattr(rio.os, "fdopen", lambda fd, mode: Breaks(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        rio.write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "eval")
    assert target.read_bytes() == b"old" and not (tmp_path / "eval.csv").exists()
    assert sorted(os.listdir(tmp_path)) == ["eval.parquet"]  # no temporary files left behind


def _run(directory, method: str, rows: list[dict]):
    import json

    directory.mkdir(parents=True)
    (directory / "reprpo_run.json").write_text(json.dumps({"method": method, "learning_rate": 1e-4}))
    (directory / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # cut off


def test_training_curves_aggregate_seeds_with_intervals(tmp_path, capsys):
    """reprpo report on run directories: per method and step the mean over seeds ± the 95% t-interval of every
    logged term (a half-written last line is skipped); one run is drawn without an interval."""
    from reprpo_trl.cli.report import main
    from reprpo_trl.curves import curve_summary

    for seed, offset in ((1, 0.0), (2, 0.2), (3, 0.4)):
        _run(tmp_path / f"dpo_s{seed}", "reprpo-prefvec", [{"step": s, "loss": 1.0 + offset - 0.1 * s, "loss/hidden": 0.5 * s, "epoch": s}
                                                            for s in (1, 2)])  # fmt: skip
    _run(tmp_path / "single", "dpo", [{"step": 1, "loss": 0.7, "rewards/margins": 0.1}])
    summary = curve_summary(sorted(tmp_path.glob("*"))).set_index(["group", "term", "step"])
    row = summary.loc[("reprpo-prefvec", "loss", 2)]
    assert row["mean"] == pytest.approx(1.0) and row.n_runs == 3
    assert row.ci95 == pytest.approx(4.302652729911275 * 0.2 / np.sqrt(3))  # t_{0.975,2} * s / sqrt(3), s = 0.2
    assert summary.loc[("reprpo-prefvec", "loss/hidden", 1)]["mean"] == pytest.approx(0.5)
    assert np.isnan(summary.loc[("dpo", "rewards/margins", 1)].ci95) and "epoch" not in summary.index.get_level_values("term")
    main([*map(str, sorted(tmp_path.glob("*"))), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| reprpo-prefvec | 3 |" in (tmp_path / "report" / "curves.md").read_text()
