"""reprpo-train from recipes: every recipe parses; a tiny end-to-end run for DPO and ReprPO."""

from pathlib import Path

import pytest
import yaml


from conftest import make_model
from reprpo_trl import ReprPOConfig
from reprpo_trl.train import TRAINERS, main, parse_args, run, trainer_name

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe):
    run_args, train_args, model_args = parse_args(["--config", str(recipe), "--use_cpu", "true"])
    expected = {name: config for name, (config, _) in TRAINERS.items()}[yaml.safe_load(recipe.read_text())["trainer"]]
    assert type(train_args) is expected
    assert model_args.model_name_or_path


def test_flags_override_recipe():
    recipe = str(Path(__file__).parents[1] / "recipes" / "reprpo_mse.yaml")
    _, train_args, _ = parse_args(["--config", recipe, "--learning_rate", "3e-5", "--alpha", "2", "--use_cpu", "true"])
    assert train_args.learning_rate == 3e-5 and train_args.alpha == 2.0 and train_args.hidden_loss == "mse"


def test_unknown_trainer():
    with pytest.raises(ValueError, match="trainer='ppo'"):
        trainer_name(["--trainer", "ppo"])


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("trainer", ["dpo", "reprpo"])
def test_end_to_end(trainer, tmp_path, saved_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "trainer": trainer, "model_name_or_path": saved_model, "use_peft": True, "lora_r": 4,
        "lora_target_modules": ["q_proj", "v_proj"], "train_dataset": "suite:add_small:train",
        "max_train_samples": 8, "max_length": 64, "per_device_train_batch_size": 4, "max_steps": 2,
        "output_dir": str(tmp_path / "out"), "report_to": "none", "save_strategy": "no", "use_cpu": True,
        "bf16": False, "logging_steps": 1,
    }))  # fmt: skip
    extra = ["--layers", "1,2"] if trainer == "reprpo" else []
    trainer_obj = run(["--config", str(recipe), *extra])
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert ("loss/hidden" in trainer_obj.state.log_history[0]) == (trainer == "reprpo")


def test_truncation_refused(tmp_path, saved_model):
    with pytest.raises(ValueError, match="exceed max_length=10"):
        main(["--trainer", "dpo", "--model_name_or_path", saved_model, "--max_length", "10", "--output_dir",
              str(tmp_path), "--use_cpu", "true", "--max_train_samples", "8"])  # fmt: skip
