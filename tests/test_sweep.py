"""reprpo-sweep: a 1 method × 2 learning rates × 2 seeds grid on a tiny model; selection, report, resume, emit."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from reprpo_trl import sweep
from reprpo_trl.errors import InputError
from reprpo_trl.provenance import RUN_RECORD

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture
def grid(tmp_path, saved_model):
    shifts = tmp_path / "shifts.yaml"
    shifts.write_text(yaml.safe_dump({"validation": ["suite:add_small:validation"], "in_domain": ["suite:add_small:test"]}))
    config = {
        "output_dir": str(tmp_path / "sweep"),
        "methods": {"dpo": str(RECIPES / "dpo.yaml")},
        "seeds": [1, 2],
        "learning_rates": [1e-4, 5e-2],
        "shifts": str(shifts),
        "train_overrides": {"model_name_or_path": saved_model, "max_train_samples": 8, "max_steps": 1,
                            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "eval_strategy": "no",
                            "use_cpu": True, "report_to": "none"},  # fmt: skip
        "eval_samples": 4,
        "eval_batch_size": 4,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_sweep_runs_selects_reports_and_resumes(grid, monkeypatch, capsys):
    sweep.main(["--config", grid])
    loaded = sweep.load_grid(grid)
    runs = sweep.runs(loaded)
    assert [r.id for r in runs] == ["dpo/lr0.0001/seed1", "dpo/lr0.0001/seed2", "dpo/lr0.05/seed1", "dpo/lr0.05/seed2"]
    assert all(r.result.exists() and (r.dir / RUN_RECORD).exists() for r in runs)
    report = (Path(loaded.output_dir) / "report" / "report.md").read_text()
    assert "## Model selection" in report and "Selected: dpo → lr" in report and "suite:add_small:validation" in report
    assert "validation" not in report.split("## Model selection")[0].replace("validation split", "")
    summary = pd.read_csv(Path(loaded.output_dir) / "report" / "summary.csv")
    assert set(summary["shift"]) == {"in_domain"} and (summary[summary.label == "dpo"].n_seeds == 2).all()
    results = pd.concat([pd.read_parquet(r.result) for r in runs])
    assert sorted(results.learning_rate.unique()) == [1e-4, 5e-2] and sorted(results.seed.unique()) == [1, 2]
    # the selection compares every learning rate, and picks the best mean validation accuracy
    validation = results[results["shift"] == "validation"].groupby("learning_rate").acc.mean()
    header = next(line for line in report.split("## Model selection")[1].splitlines() if line.startswith("| method"))
    assert "0.0001" in header and "0.05" in header
    best = validation[validation == validation.max()].index.min()
    assert f"Selected: dpo → lr {best:g}." in report
    assert summary[summary.label == "dpo"]["mean"].notna().all()

    # resume: only the run without a result is evaluated again, and nothing is retrained
    runs[1].result.unlink()
    monkeypatch.setattr(sweep.train, "run", lambda argv: pytest.fail("a finished training ran again"))
    evaluated = []
    real = sweep.evaluate_models
    monkeypatch.setattr(sweep, "evaluate_models", lambda *a, **k: evaluated.append(a[1]) or real(*a, **k))
    sweep.main(["--config", grid])
    assert evaluated == [[str(runs[1].dir)]] and runs[1].result.exists()

    # emit: one command per unfinished run
    runs[2].result.unlink()
    capsys.readouterr()
    sweep.main(["--config", grid, "--emit"])
    assert capsys.readouterr().out.split("\n")[:-1] == [f"reprpo-sweep --config {grid} --only dpo/lr0.05/seed1"]
    with pytest.raises(RuntimeError, match="1 run\\(s\\) not finished"):
        sweep.report(loaded)
    sweep.main(["--config", grid, "--only", "dpo/lr0.05/seed1"])
    assert runs[2].result.exists()


def test_grid_errors(tmp_path, grid):
    raw = yaml.safe_load(Path(grid).read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "learning_rate": [1e-4]}))
    with pytest.raises(InputError, match="unknown key\\(s\\) \\['learning_rate'\\]; did you mean 'learning_rates'"):
        sweep.load_grid(str(bad))
    bad.write_text(yaml.safe_dump({**raw, "methods": {"x": "nope.yaml"}}))
    with pytest.raises(InputError, match="recipe 'nope.yaml' of method 'x': no such file"):
        sweep.load_grid(str(bad))
    no_validation = tmp_path / "s.yaml"
    no_validation.write_text(yaml.safe_dump({"in_domain": ["suite:add_small:test"]}))
    bad.write_text(yaml.safe_dump({**raw, "shifts": str(no_validation)}))
    with pytest.raises(ValueError, match="needs a 'validation' shift"):
        sweep.load_grid(str(bad))


def test_slurm_array_template_runs_its_line(tmp_path):
    import os
    import subprocess

    commands = tmp_path / "runs.txt"
    commands.write_text(f"echo first > {tmp_path}/ran\necho second > {tmp_path}/ran\n")
    script = Path(__file__).parents[1] / "slurm" / "sweep_array.sbatch"
    subprocess.run(["bash", str(script), str(commands)], check=True, env={**os.environ, "SLURM_ARRAY_TASK_ID": "2"})
    assert (tmp_path / "ran").read_text() == "second\n"
