"""reprpo sweep: a 1 method × 2 learning rates × 2 seeds grid on a tiny model; selection, report, resume, emit;
run identity (a changed setting trains or evaluates again, the report states what the results were made with)."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from reprpo_trl import sweep
from reprpo_trl.cli.sweep import main
from reprpo_trl.errors import InputError
from reprpo_trl.io import atomic_write_text
from reprpo_trl.provenance import RUN_RECORD, read_run_record

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
        "shifts": "shifts.yaml",  # relative to the grid's directory
        "train_overrides": {"model_name_or_path": saved_model, "max_train_samples": 8, "max_steps": 1,
                            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "eval_strategy": "no",
                            "use_cpu": True, "report_to": "none", "logging_steps": 1},  # fmt: skip
        "eval_samples": 4,
        "eval_batch_size": 4,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _edit(path: str, **changes) -> None:
    config = yaml.safe_load(Path(path).read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    Path(path).write_text(yaml.safe_dump(config))


def test_sweep_runs_selects_reports_and_resumes(grid, monkeypatch, capsys):
    main(["--config", grid])
    loaded = sweep.load_grid(grid)
    runs = sweep.plan(loaded)
    assert [r.id for r in runs] == ["dpo/lr0.0001/seed1", "dpo/lr0.0001/seed2", "dpo/lr0.05/seed1", "dpo/lr0.05/seed2"]
    assert all(r.dir.name == f"seed{r.seed}-{r.hash}" and (r.dir / RUN_RECORD).exists() for r in runs)
    assert all(sweep.result_path(r.dir, loaded).exists() for r in runs) and len({r.hash for r in runs}) == 4
    report = (Path(loaded.output_dir) / "report" / "report.md").read_text()
    assert "## Model selection" in report and "Selected: dpo → lr" in report and "suite:add_small:validation" in report
    assert "validation" not in report.split("## Model selection")[0].replace("validation split", "")
    assert "4 pairs per dataset; suite seed 0 (as the results record them)" in report
    assert (Path(loaded.output_dir) / "report" / "curves.png").exists() and "![curves](curves.png)" in report
    summary = pd.read_csv(Path(loaded.output_dir) / "report" / "summary.csv")
    assert set(summary["shift"]) == {"in_domain"} and (summary[summary.label == "dpo"].n_seeds == 2).all()
    results = pd.concat([pd.read_parquet(sweep.result_path(r.dir, loaded)) for r in runs])
    assert sorted(results.learning_rate.unique()) == [1e-4, 5e-2] and sorted(results.seed.unique()) == [1, 2]
    validation = results[results["shift"] == "validation"].groupby("learning_rate").acc.mean()
    header = next(line for line in report.split("## Model selection")[1].splitlines() if line.startswith("| method"))
    assert "0.0001" in header and "0.05" in header
    best = validation[validation == validation.max()].index.min()
    assert f"Selected: dpo → lr {best:g}." in report
    assert f"| dpo | {best:g} | 1, 2 | suite:add_small:train (suite seed 0) | 8 | 1 |" in report  # from the run records
    assert "hold runs of other settings" not in report  # the rate not selected is of this grid

    # resume: only the run without a result is evaluated again, and nothing is retrained
    sweep.result_path(runs[1].dir, loaded).unlink()
    monkeypatch.setattr(sweep.train, "run", lambda argv: pytest.fail("a finished training ran again"))
    evaluated = []
    real = sweep.evaluate_models
    monkeypatch.setattr(sweep, "evaluate_models", lambda *a, **k: evaluated.append(a[1]) or real(*a, **k))
    main(["--config", grid])
    assert evaluated == [[str(runs[1].dir)]]

    # an evaluation setting changed: every run and the base are evaluated again, none is trained again, and the
    # report states what the results were made with (it said 4 pairs; the grid now says 2)
    evaluated.clear()
    _edit(grid, eval_samples=2)
    main(["--config", grid])
    assert sorted(map(tuple, evaluated)) == sorted([()] + [(str(r.dir),) for r in runs])
    report = (Path(loaded.output_dir) / "report" / "report.md").read_text()
    assert "2 pairs per dataset" in report and "4 pairs per dataset" not in report
    assert len(list(runs[0].dir.glob("eval-*.parquet"))) == 2  # the first evaluation stays on disk

    # a training setting changed: a new run (another directory), listed as unfinished; the old one is left alone
    _edit(grid, train_overrides={"max_train_samples": 6})
    changed = sweep.plan(sweep.load_grid(grid))
    assert all(new.hash != old.hash and new.dir != old.dir for new, old in zip(changed, runs))
    capsys.readouterr()
    main(["--config", grid, "--emit"])
    assert capsys.readouterr().out.split("\n")[:-1] == [f"reprpo sweep --config {grid} --only {r.id}" for r in runs]
    with pytest.raises(InputError, match="4 run\\(s\\) not finished"):
        sweep.report(sweep.load_grid(grid), changed)
    monkeypatch.undo()
    main(["--config", grid, "--only", "dpo/lr0.05/seed1"])
    assert read_run_record(changed[2].dir)["train_rows"] == 6 and read_run_record(runs[2].dir)["train_rows"] == 8

    # a run directory whose run record holds other settings than its name says is refused, naming them
    record = read_run_record(changed[2].dir)
    record["settings"]["beta"], record["settings_hash"] = 0.5, "0" * 12
    atomic_write_text(changed[2].dir / RUN_RECORD, json.dumps(record))
    sweep.result_path(changed[2].dir, sweep.load_grid(grid)).unlink()
    with pytest.raises(InputError, match=r"holds a run trained with other settings \(differing: \['beta'\]\)"):
        sweep.run_one(sweep.load_grid(grid), changed[2])


def test_code_revision_policy(grid, monkeypatch):
    monkeypatch.setenv("REPRPO_CODE_REVISION", "abc")
    recorded = sweep.plan(sweep.load_grid(grid))
    monkeypatch.setenv("REPRPO_CODE_REVISION", "def")
    assert [r.hash for r in sweep.plan(sweep.load_grid(grid))] == [r.hash for r in recorded]  # record: reused
    _edit(grid, code_revision="match")
    matched = sweep.plan(sweep.load_grid(grid))
    assert all(new.hash != old.hash for new, old in zip(matched, recorded))
    monkeypatch.setenv("REPRPO_CODE_REVISION", "abc")
    assert all(new.hash != old.hash for new, old in zip(sweep.plan(sweep.load_grid(grid)), matched))


def test_grid_errors(tmp_path, grid):
    raw = yaml.safe_load(Path(grid).read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "learning_rate": [1e-4]}))
    with pytest.raises(InputError, match="unknown key\\(s\\) \\['learning_rate'\\]; did you mean 'learning_rates'"):
        sweep.load_grid(str(bad))
    bad.write_text(yaml.safe_dump({**raw, "methods": {"x": "nope.yaml"}}))
    with pytest.raises(InputError, match=f"recipe '{tmp_path}/nope.yaml' of method 'x': no such file"):
        sweep.load_grid(str(bad))
    no_validation = tmp_path / "s.yaml"
    no_validation.write_text(yaml.safe_dump({"in_domain": ["suite:add_small:test"]}))
    bad.write_text(yaml.safe_dump({**raw, "shifts": str(no_validation)}))
    with pytest.raises(ValueError, match="needs a 'validation' shift"):
        sweep.load_grid(str(bad))


def test_slurm_array_template_submits_itself_and_runs_its_line(tmp_path):
    """Outside slurm it creates the log folder it names and submits itself as an array of one task per line;
    inside an array task it runs its line."""
    commands = tmp_path / "runs.txt"
    commands.write_text(f"echo first > {tmp_path}/ran\necho second > {tmp_path}/ran\n")
    script = Path(__file__).parents[1] / "slurm" / "sweep_array.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/submitted\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    subprocess.run(["bash", str(script), str(commands)], check=True, env=env, cwd=tmp_path)
    assert (tmp_path / "logs").is_dir()
    assert (tmp_path / "submitted").read_text().split() == ["--array=1-2", str(script), str(commands)]
    subprocess.run(["bash", str(script), str(commands)], check=True, env={**env, "SLURM_ARRAY_TASK_ID": "2"}, cwd=tmp_path)
    assert (tmp_path / "ran").read_text() == "second\n"


def test_templates_and_grids_agree_on_devices():
    """The template asks for a GPU; no shipped grid pins its runs to the CPU."""
    assert "#SBATCH --gpus=1" in (Path(__file__).parents[1] / "slurm" / "sweep_array.sbatch").read_text()
    for path in (RECIPES / "sweeps").glob("*.yaml"):
        assert "use_cpu" not in yaml.safe_load(path.read_text()).get("train_overrides", {}), path
