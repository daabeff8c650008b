"""`accelerate launch -m reprpo_trl.train`: one process, and two CPU processes (gloo DDP), on a tiny model. Equality
with one process under DDP and DeepSpeed is tests/test_distributed.py."""

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
