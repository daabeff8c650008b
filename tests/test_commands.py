"""The `reprpo` command: subcommands, help that lists only what the trainer accepts (without importing torch),
`python -m reprpo_trl.train`, env, the recipes the package ships (pkg:), paths inside YAML files, models path,
and files written with the user's umask."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reprpo_trl.cli import main
from reprpo_trl.cli import help as train_help
from reprpo_trl.io import atomic_write_text, user_mode
from reprpo_trl.train import parse_args

ROOT = Path(__file__).resolve().parents[1]


def output(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    return capsys.readouterr().out


def test_subcommands_listed_and_unknown_refused(capsys):
    listed = output(capsys, ["--help"])
    for name in ("train", "eval", "icl-eval", "report", "sweep", "demo", "dynamics", "recipes", "models", "env"):
        assert f"reprpo {name}" in listed
    with pytest.raises(SystemExit) as exit_:
        main(["trian"])
    assert exit_.value.code == 2 and "did you mean `reprpo train`?" in capsys.readouterr().err


def test_help_snapshot_is_current_and_prints_what_the_real_parser_prints():
    data = train_help.snapshot()
    assert train_help.load() == data  # the shipped snapshot: `python -m reprpo_trl.cli.help` rewrites it
    from reprpo_trl.train import TRAINERS, parser

    assert set(train_help.TRAINERS) == set(TRAINERS)
    for trainer in TRAINERS:
        assert train_help.build(data, trainer).format_help() == parser(trainer).format_help()


@pytest.mark.parametrize("form", ["spaced", "joined"])
def test_train_help_lists_only_accepted_flags_with_the_recipes_values(capsys, form):
    reprpo = str(ROOT / "recipes" / "reprpo_mse.yaml")
    config = ["--config", reprpo] if form == "spaced" else [f"--config={reprpo}"]
    shown = output(capsys, ["train", *config, "--help"])
    assert "--hidden_loss" in shown and "(default: mse)" in shown and "--adapter_r" in shown
    assert "--use_peft" not in shown and "--lora_r" not in shown and "--load_in_4bit" not in shown
    dpo = output(capsys, ["train", *config, "--trainer" if form == "spaced" else "--trainer=dpo", *(["dpo"] if form == "spaced" else []), "--help"])
    assert "--beta" in dpo and "--hidden_loss" not in dpo


def test_help_and_module_entry_point_need_no_torch():
    """`reprpo train --help` renders from the snapshot (torch is never imported: that is what makes it fast), and
    `python -m reprpo_trl.train`, the entry point of `accelerate launch -m`, is reprpo train."""
    code = ("import sys, runpy; sys.argv = ['reprpo_trl.train', '--config', 'pkg:dpo.yaml', '--help']\n"
            "try:\n    runpy.run_module('reprpo_trl.train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert "--beta" in done.stdout and "--use_peft" not in done.stdout
    code = "import sys\nfrom reprpo_trl.cli import main\ntry:\n    main(['train', '--config', 'pkg:dpo.yaml', '--help'])\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert "--beta" in done.stdout and done.stdout.rstrip().endswith("TORCH False")


def test_env_prints_versions_for_bug_reports(capsys):
    from importlib.metadata import version

    shown = output(capsys, ["env"])
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        assert f"- {name}: {version(name)}" in shown
    assert "- devices: " in shown and "- reprpo_trl: " in shown


def test_packaged_recipes_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    listed = output(capsys, ["recipes", "list"])
    assert "pkg:dpo.yaml" in listed and "pkg:sweeps/suite_methods.yaml" in listed and "pkg:shifts/suite.yaml" in listed
    run_args, train_args, _, _ = parse_args(["--config", "pkg:reprpo_mse.yaml", "--use_cpu", "true"])
    assert run_args.trainer == "reprpo" and train_args.hidden_loss == "mse"
    with pytest.raises(ValueError, match="the package ships it as pkg:dpo.yaml"):
        parse_args(["--config", "recipes/dpo.yaml", "--use_cpu", "true"])
    output(capsys, ["recipes", "copy", "sweeps/suite_methods.yaml", "--to", "mine"])
    grid = yaml.safe_load((tmp_path / "mine" / "sweeps" / "suite_methods.yaml").read_text())
    for recipe in grid["methods"].values():  # the grid's relative paths hold in the copy
        assert (tmp_path / "mine" / "sweeps" / recipe).resolve().is_file()
    assert output(capsys, ["recipes", "show", "pkg:dpo.yaml"]) == (ROOT / "recipes" / "dpo.yaml").read_text()


def test_paths_inside_a_recipe_resolve_against_its_directory(tmp_path, monkeypatch):
    (tmp_path / "exp" / "data").mkdir(parents=True)
    (tmp_path / "exp" / "data" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n')
    recipe = {"trainer": "dpo", "train_dataset": "data/pairs.jsonl", "shift_eval": "../shifts.yaml"}
    (tmp_path / "exp" / "run.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "shifts.yaml").write_text("in_domain: [suite:add_small:test]\n")
    monkeypatch.chdir(tmp_path.parent)
    run_args, *_ = parse_args(["--config", str(tmp_path / "exp" / "run.yaml"), "--use_cpu", "true"])
    assert run_args.train_dataset == str(tmp_path / "exp" / "data" / "pairs.jsonl")
    assert Path(run_args.shift_eval).resolve() == tmp_path / "shifts.yaml"


def test_models_path_prints_where_a_name_loads_from(tmp_path, capsys):
    assert output(capsys, ["models", "path", "HuggingFaceTB/SmolLM2-135M-Instruct"]).strip() == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert output(capsys, ["models", "path", str(tmp_path)]).strip() == str(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_results_take_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "result.csv", "a\n")
        assert stat.S_IMODE((tmp_path / "result.csv").stat().st_mode) == 0o666 & ~mask == user_mode()
    finally:
        os.umask(old)
