"""reprpo-train from recipes: every recipe parses; a tiny end-to-end run for DPO and ReprPO."""

import json
from pathlib import Path

import pytest
import yaml

from reprpo_trl import ReprPOConfig
from reprpo_trl.models import EMBEDDED_MODEL
from reprpo_trl.provenance import method_name, read_run_record
from reprpo_trl.train import TRAINERS, parse_args, run, trainer_name

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe):
    run_args, train_args, model_args, adapter_args = parse_args(["--config", str(recipe), "--use_cpu", "true"])
    expected = {name: config for name, (config, _) in TRAINERS.items()}[yaml.safe_load(recipe.read_text())["trainer"]]
    assert type(train_args) is expected
    assert model_args.model_name_or_path


def test_flags_override_recipe():
    recipe = str(Path(__file__).parents[1] / "recipes" / "reprpo_mse.yaml")
    _, train_args, _, _ = parse_args(["--config", recipe, "--learning_rate", "3e-5", "--alpha", "2", "--use_cpu", "true"])
    assert train_args.learning_rate == 3e-5 and train_args.alpha == 2.0 and train_args.hidden_loss == "mse"


def test_unknown_trainer():
    with pytest.raises(ValueError, match="trainer='ppo'"):
        trainer_name(["--trainer", "ppo"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_trains_end_to_end(recipe, tmp_path, saved_model):
    """Each recipe as shipped, on a tiny model and 8 pairs for one step: it builds, trains, logs and saves."""
    trainer = yaml.safe_load(recipe.read_text())["trainer"]
    flags = ["--model_name_or_path", saved_model, "--max_train_samples", "8", "--max_steps", "1",
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--eval_strategy", "no",
             "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    if trainer == "reprpo":
        flags += ["--layers", "1,2"]
    method = yaml.safe_load(recipe.read_text()).get("ia2_method")
    if trainer == "ia2":
        flags += ["--num_demos", "2", "--target_cache_dir", str(tmp_path / "cache")]
    if method in ("a2t", "t2a"):  # continues the adapter of the recipe it names
        first = recipe.with_name(recipe.name.replace(method, "act" if method == "a2t" else "tok"))
        run(["--config", str(first), *flags, "--output_dir", str(tmp_path / "first")])
        flags += ["--init_adapter", str(tmp_path / "first")]
    trainer_obj = run(["--config", str(recipe), *flags])
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    logged = trainer_obj.state.log_history[0]
    assert ("loss/hidden" in logged) == (trainer == "reprpo")
    assert ("projgrad/parallel_fraction" in logged) == (trainer == "projgrad")
    assert ("ia2/tok" in logged) == (trainer == "ia2")
    if yaml.safe_load(recipe.read_text()).get("transform", "none") != "none":
        assert (tmp_path / "out" / "reprpo_transforms.json").exists()
    record = read_run_record(tmp_path / "out")
    assert record["recipe"] == str(recipe) and record["trainer"] == trainer and record["seed"] == 42
    assert record["method"] == method_name(trainer, trainer_obj.args)


def test_shift_eval_flags_add_generalisation_curves(tmp_path, saved_model):
    shifts = str(Path(__file__).parents[1] / "recipes" / "shifts" / "suite.yaml")
    trainer = run(["--trainer", "dpo", "--model_name_or_path", saved_model, "--max_train_samples", "8", "--max_steps", "2",
                   "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path), "--use_cpu", "true",
                   "--report_to", "none", "--adapter", "lora", "--adapter_targets", "qv",
                   "--shift_eval", shifts, "--shift_eval_steps", "1", "--shift_eval_samples", "4"])  # fmt: skip
    curves = [row for row in trainer.state.log_history if "shift/cross_domain/acc" in row]
    assert [row["step"] for row in curves] == [1, 2] and "shift/unrelated/nll_ratio" in curves[0]
    assert read_run_record(tmp_path)["method"] == "dpo"


def test_truncation_refused(tmp_path, saved_model):
    with pytest.raises(ValueError, match="exceed max_length=10"):
        run(["--trainer", "dpo", "--model_name_or_path", saved_model, "--max_length", "10", "--output_dir",
              str(tmp_path), "--use_cpu", "true", "--max_train_samples", "8"])  # fmt: skip


DPO_RECIPE = str(Path(__file__).parents[1] / "recipes" / "dpo.yaml")


def test_flag_equals_value_forms_mean_what_the_spaced_forms_mean():
    """--config=x and --trainer=y are read like --config x and --trainer y (the = form once ignored the recipe)."""
    spaced = parse_args(["--config", DPO_RECIPE, "--use_cpu", "true", "--learning_rate", "3e-5"])
    joined = parse_args([f"--config={DPO_RECIPE}", "--use_cpu=true", "--learning_rate=3e-5"])
    assert type(joined[1]) is type(spaced[1]) and joined[1].learning_rate == spaced[1].learning_rate == 3e-5
    assert joined[0].train_dataset == spaced[0].train_dataset == "suite:add_small:train"
    mse = str(Path(__file__).parents[1] / "recipes" / "reprpo_mse.yaml")
    for argv in (["--config", mse, "--trainer", "dpo"], [f"--config={mse}", "--trainer=dpo"]):
        with pytest.raises(ValueError, match="hidden_loss is a field of trainer\\(s\\) reprpo; this recipe uses trainer dpo"):
            parse_args([*argv, "--use_cpu", "true"])


def test_a_run_evaluates_only_where_its_recipe_says(tmp_path, saved_model):
    """dpo.yaml evaluates every 50 steps: a 2-step run neither loads its eval set nor evaluates at the end, and
    eval_strategy no loads nothing to precompute; the log history is kept in the run directory."""
    flags = ["--config", DPO_RECIPE, "--model_name_or_path", saved_model, "--max_train_samples", "8", "--max_steps", "2",
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--use_cpu", "true",
             "--logging_steps", "1", "--output_dir", str(tmp_path / "steps")]  # fmt: skip
    trainer = run(flags)
    assert trainer.eval_dataset is None and not [row for row in trainer.state.log_history if "eval_loss" in row]
    kept = [json.loads(line) for line in (tmp_path / "steps" / "log_history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in kept if "loss" in row] == [1, 2] and "rewards/margins" in kept[0]
    trainer = run([*flags, "--eval_strategy", "no", "--precompute_ref_log_probs", "true", "--output_dir", str(tmp_path / "no")])
    assert trainer.eval_dataset is None
    trainer = run([*flags, "--eval_steps", "1", "--max_eval_samples", "4", "--output_dir", str(tmp_path / "asked")])
    assert [row["step"] for row in trainer.state.log_history if "eval_loss" in row] == [1, 2]


def test_adapter_names_its_base_as_the_recipe_gives_it(tmp_path, saved_model, monkeypatch):
    """The embedded model loads from a cache directory; the saved adapter names `embedded/...`, which
    `reprpo models path` (and resolve_model) turn into that directory on any machine."""
    import reprpo_trl.train as train

    monkeypatch.setattr(train, "resolve_model", lambda name: saved_model if name == EMBEDDED_MODEL else name)
    run(["--config", DPO_RECIPE, "--max_train_samples", "8", "--max_steps", "1", "--per_device_train_batch_size", "4",
         "--use_cpu", "true", "--output_dir", str(tmp_path)])  # fmt: skip
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_MODEL
