"""`accelerate launch -m reprpo_trl.train`: one process, and two CPU processes (gloo DDP), on a tiny model."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_model

ROOT = Path(__file__).parents[1]


@pytest.fixture
def tiny_recipe(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "trainer": "reprpo", "model_name_or_path": str(path), "adapter": {"type": "lora", "r": 4, "targets": "qv"},
        "train_dataset": "suite:add_small:train", "layers": "1,2",
        "max_train_samples": 16, "max_length": 64, "per_device_train_batch_size": 2, "max_steps": 2,
        "output_dir": str(tmp_path / "out"), "report_to": "none", "save_strategy": "no", "use_cpu": True,
        "bf16": False, "logging_steps": 1, "precompute_ref_log_probs": True,
    }))  # fmt: skip
    return recipe


def launch(accelerate_config, recipe):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "-m", "reprpo_trl.train", "--config", str(recipe)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_launch(processes, tmp_path, tiny_recipe):
    if processes == 1:
        config = ROOT / "accelerate_configs" / "single.yaml"
    else:
        config = multi_cpu_config(tmp_path, 29533)
    result = launch(config, tiny_recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'loss/hidden'" in result.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def multi_cpu_config(tmp_path, port):
    """Two gloo DDP processes on CPU. (distributed_type MULTI_CPU on one machine starts a single process unless
    mpirun is used; MULTI_GPU with use_cpu goes through torchrun and falls back to gloo.)"""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": 2,
        "num_machines": 1, "machine_rank": 0, "mixed_precision": "no", "use_cpu": True,
        "main_process_ip": "127.0.0.1", "main_process_port": port,
    }))  # fmt: skip
    return config


@pytest.mark.parametrize(
    "method",
    [
        {"trainer": "projgrad", "proj_beta": 0.2},
        {"trainer": "reprpo", "layers": "1,2", "hidden_loss": "rank", "transform": "ether"},
        {"trainer": "ia2", "ia2_method": "tna", "train_dataset": "suite:sentiment", "num_demos": 2, "max_length": 128},
    ],
    ids=["projgrad", "reprpo-ether", "ia2-tna"],
)
def test_ddp_matches_one_process(method, tmp_path, tiny_recipe):
    """One SGD step on 4 pairs, as 2 processes x 2 pairs or 1 process x 4 pairs, gives the same adapter (and
    transform): ProjGrad sums its direction over processes before projecting the all-reduced gradient, ReprPO
    averages the gradients of the transform, which lives outside the DDP model, and IA2 divides its per-token
    terms by the target tokens of all processes (its teacher targets are computed once, by the main process)."""
    from safetensors.torch import load_file

    recipe = yaml.safe_load(tiny_recipe.read_text())
    del recipe["layers"], recipe["precompute_ref_log_probs"]
    recipe.update(method, optim="sgd", learning_rate=0.5, max_train_samples=4, max_steps=1)
    files = ["adapter_model.safetensors"] + (["reprpo_transforms.safetensors"] if "transform" in method else [])
    weights = []
    for processes, config in ((1, ROOT / "accelerate_configs" / "single.yaml"), (2, multi_cpu_config(tmp_path, 29534))):
        out = tmp_path / f"out{processes}"
        path = tmp_path / f"recipe{processes}.yaml"
        if recipe["trainer"] == "ia2":
            recipe["target_cache_dir"] = str(tmp_path / "cache")
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(out), "per_device_train_batch_size": 4 // processes}))
        result = launch(config, path)
        assert result.returncode == 0, result.stderr[-3000:]
        weights.append({f"{f}:{k}": v for f in files for k, v in load_file(out / f).items()})
    assert weights[0].keys() == weights[1].keys()
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights[0].items())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-5, rtol=1e-3)
