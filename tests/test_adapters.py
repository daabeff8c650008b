"""The adapter section and builder: every trainer with every adapter that makes sense trains the right
parameters, leaves the rest alone, and saves artifacts that reload; the rest is refused at start-up."""

from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import on_cpu
from reprpo_trl.adapters import ADAPTERS, PROMPT_LEARNING, AdapterArguments, build_peft_config, target_modules
from reprpo_trl.train import build_trainer, parse_args

TRAINERS = ("dpo", "reprpo", "projgrad", "projbp")


def test_target_letters_and_names():
    assert target_modules("qkvo") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert target_modules("gud") == ["gate_proj", "up_proj", "down_proj"]
    assert target_modules("q_proj, fc1") == ["q_proj", "fc1"]
    assert target_modules("fc1") == ["fc1"] and target_modules("qx") == ["qx"]  # letters only when all are qkvogud
    with pytest.raises(ValueError, match="adapter='adam'"):
        AdapterArguments(adapter="adam")


def test_peft_configs():
    ia3 = build_peft_config(AdapterArguments(adapter="ia3", adapter_targets="kvd"))
    assert sorted(ia3.target_modules) == ["down_proj", "k_proj", "v_proj"] and sorted(ia3.feedforward_modules) == ["down_proj"]
    hira = build_peft_config(AdapterArguments(adapter="hira", adapter_r=4, adapter_targets="qv"))
    assert type(hira).__name__ == "HiraConfig" and hira.r == 4
    assert build_peft_config(AdapterArguments(adapter="prompt", adapter_virtual_tokens=5)).num_virtual_tokens == 5
    assert build_peft_config(AdapterArguments(adapter="full")) is None


def _recipe(tmp_path, saved_model, trainer, adapter):
    recipe = {"trainer": trainer, "model_name_or_path": saved_model, "adapter": {"type": adapter, "r": 4, "targets": "qvd",
              "virtual_tokens": 3}, "max_train_samples": 8, "max_steps": 2, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none",
              "save_strategy": "no", "logging_steps": 1}  # fmt: skip
    if trainer == "reprpo":
        recipe["layers"] = "1,2"
    if adapter == "prefix":
        recipe["gradient_checkpointing"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_section_flags_and_overrides(tmp_path, saved_model):
    recipe = _recipe(tmp_path, saved_model, "dpo", "hira")
    _, _, _, adapter = parse_args(["--config", recipe, "--adapter_r", "2"])
    assert adapter.adapter == "hira" and adapter.adapter_r == 2 and adapter.adapter_targets == "qvd"
    with pytest.raises(ValueError, match="`adapter:` section"):
        parse_args(["--config", recipe, "--use_peft", "true"])
    with pytest.raises(ValueError, match="prefix would never train"):
        parse_args(["--config", recipe, "--adapter", "prefix", "--gradient_checkpointing", "true"])


@pytest.mark.parametrize("trainer", ["projgrad", "projbp"])
@pytest.mark.parametrize("adapter", PROMPT_LEARNING)
def test_refused_combinations(trainer, adapter, tmp_path, saved_model):
    with pytest.raises(ValueError, match=f"trainer '{trainer}' cannot train adapter '{adapter}'"):
        parse_args(["--config", _recipe(tmp_path, saved_model, trainer, adapter)])


COMBINATIONS = [(t, a) for t in TRAINERS for a in ADAPTERS if not (t.startswith("proj") and a in PROMPT_LEARNING)]


@pytest.mark.parametrize("trainer,adapter", COMBINATIONS, ids=[f"{t}-{a}" for t, a in COMBINATIONS])
def test_trains_the_adapter_only_and_reloads(trainer, adapter, tmp_path, saved_model):
    trainer_obj = build_trainer(*parse_args(["--config", _recipe(tmp_path, saved_model, trainer, adapter)]))
    model = trainer_obj.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer_obj.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable, f"changed outside the trainable set: {sorted(changed - trainable)[:3]}"
    if adapter != "full":
        assert not any("base_layer" in n or n.endswith("embed_tokens.weight") for n in trainable)
        assert len(trainable) < len(before) / 2
    out = tmp_path / "out"
    trainer_obj.save_model(str(out))
    base = AutoModelForCausalLM.from_pretrained(saved_model)
    if adapter == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        saved = dict(reloaded.named_parameters())
        trained = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    else:
        reloaded = PeftModel.from_pretrained(base, out)
        saved, trained = dict(reloaded.named_parameters()), dict(model.named_parameters())
    for name in changed:
        name = name.removeprefix("base_model.model.") if adapter == "full" else name
        assert torch.allclose(saved[name], on_cpu(trained[name].detach())), name
