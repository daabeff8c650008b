"""Two processes under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (CPU, through `accelerate launch`; FSDP2 kept on
CPU by tests/fsdp_on_cpu.py) train exactly what one process trains with the same global batch: ReprPO with a
trained transform, ProjGrad (with project_update), ProjBP, IA2 act and full fine-tuning (ReprPO mse), 3 optimizer
steps of 2 accumulated micro-batches each. Parameters, transforms and every logged term agree; the adapters reload
with peft and the full model with transformers, to the bit; sharded checkpoints resume to the same weights.

Tolerance: 1e-5 absolute + 1e-3 relative on weights, 1e-4 relative on logged terms. The runs differ only in how
float32 sums are split and ordered (per process, then all-reduced or reduce-scattered), which moves results by a
few ulps per step; a wrong reduction (a missing all-reduce, a per-process direction, a per-process token count)
moves them by whole percent, which is what the test catches."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_model

ROOT = Path(__file__).parents[1]
METHODS = {
    # a transform gets gradient only once the policy has left the reference: a large alpha (unclipped) moves it
    # ~1e-3 in 3 steps; at learning rate 0.5 it moves ~0.2, where ulps grow into 4e-4 relative differences
    "reprpo-ether": {"trainer": "reprpo", "layers": "1,2", "hidden_loss": "rank", "transform": "ether", "alpha": 1e4,
                     "max_grad_norm": 0.0, "learning_rate": 0.2},
    "projgrad": {"trainer": "projgrad", "proj_beta": 0.2, "project_update": True},
    "projbp": {"trainer": "projbp", "proj_beta": 0.2},
    # ZeRO-3 cannot checkpoint the layers IA2 act reads inside (refused at start-up; tests/test_reliability.py)
    # a tiny random model's attention barely depends on the demonstrations: act ~ 1e-5, so a large step size
    "ia2-act": {"trainer": "ia2", "ia2_method": "act", "train_dataset": "suite:sentiment", "num_demos": 2,
                "max_length": 128, "gradient_checkpointing": False, "learning_rate": 1000.0},
    # every weight trained, the reference a frozen copy: the engines save the complete model, not an adapter
    "reprpo-full": {"trainer": "reprpo", "layers": "1,2", "hidden_loss": "mse", "adapter": {"type": "full"},
                    "learning_rate": 0.05},
}  # fmt: skip
BACKENDS = {
    "ddp": {"distributed_type": "MULTI_GPU"},
    "zero2": {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}},
    "zero3": {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True,
                                                                    "zero3_save_16bit_model": True}},
    # accelerate's FSDP2 (fully_shard, sharded checkpoints) kept on CPU by tests/fsdp_on_cpu.py
    "fsdp2": {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False}},
}
TERMS = ("loss", "loss/dpo", "loss/hidden", "hidden/layer_1", "hidden/rank_margin", "projgrad/parallel_fraction",
         "rewards/margins", "ia2/act", "ia2/tok")  # fmt: skip


def launch(tmp_path: Path, name: str, processes: int, backend: dict, recipes: list[Path], port: int, *flags) -> Path:
    """Trains every recipe in one launch of `processes` processes into tmp_path/name/<recipe>; `flags` are
    reprpo-train flags for every run."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "num_processes": processes, "num_machines": 1, "machine_rank": 0,
        "mixed_precision": "no", "use_cpu": True, "main_process_ip": "127.0.0.1", "main_process_port": port,
        **({"distributed_type": "NO"} if processes == 1 else backend),
    }))  # fmt: skip
    out = tmp_path / name
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           str(ROOT / "tests" / "distributed_matrix.py"), str(out), *map(str, recipes), "--", *flags]  # fmt: skip
    # deprecation warnings off, so that a failure's stderr tail shows the failure
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def weights(out: Path) -> dict:
    files = ("adapter_model.safetensors", "reprpo_transforms.safetensors", "model.safetensors")
    return {f"{f}:{k}": v for f in files if (out / f).exists() for k, v in load_file(out / f).items()}


def trained_weights(name: str, saved: dict, model: Path) -> list[str]:
    """The keys of what `name` trains: LoRA B, or (full fine-tuning) every tensor; each checked to have moved."""
    if name.endswith("-full"):
        initial = load_file(model / "model.safetensors")
        keys = [k for k in saved if k.startswith("model.safetensors:")]
        assert {k.split(":", 1)[1] for k in keys} == initial.keys(), f"{name}: not the complete model"
        assert any((saved[k] - initial[k.split(":", 1)[1]]).abs().max() > 1e-3 for k in keys), f"{name} did not train"
        return keys
    keys = [k for k in saved if "lora_B" in k]
    assert keys and any(saved[k].abs().max() > 1e-3 for k in keys), f"{name}: LoRA B did not train"
    return keys


def reload(name: str, out: Path, model: Path) -> dict:
    """What transformers / peft load from `out`, keyed as weights() keys it."""
    if name.endswith("-full"):
        loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
        return {f"model.safetensors:{k}": v for k, v in loaded.items()}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out)
    return {f"adapter_model.safetensors:{k.replace('.default', '')}": v for k, v in reloaded.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("matrix")
    model = tmp / "tiny"
    make_model(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    recipes = []
    for name, method in METHODS.items():
        recipe = {
            "model_name_or_path": str(model), "adapter": {"type": "lora", "r": 4, "targets": "qv"},
            "train_dataset": "suite:add_small:train", "max_train_samples": 8, "max_length": 64, "max_steps": 3,
            "gradient_accumulation_steps": 2, "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant",
            "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "report_to": "none", "use_cpu": True, "bf16": False, "seed": 1,
            "target_cache_dir": str(tmp / "cache"), **method,
        }  # fmt: skip
        if recipe["trainer"] != "ia2":
            del recipe["target_cache_dir"]
        recipes.append(tmp / f"{name}.yaml")
        recipes[-1].write_text(yaml.safe_dump(recipe))
    # every optimizer step sees all 8 examples (4 per micro-batch here, 2 per process below), so the order in
    # which the sampler deals them out cannot matter
    for path in recipes:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "per_device_train_batch_size": 4}))
    single = launch(tmp, "single", 1, {}, recipes, 29610)
    for path in recipes:
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "per_device_train_batch_size": 2}))
    return tmp, model, recipes, single


@pytest.fixture(scope="module")
def two_processes(setup):
    """backend -> the 2-process launch of every recipe under it, run once (the matrix and the resume test read it)."""
    tmp, _, recipes, _ = setup
    runs = {}

    def run(backend: str) -> Path:
        if backend not in runs:
            runs[backend] = launch(tmp, backend, 2, BACKENDS[backend], recipes, 29611 + list(BACKENDS).index(backend))
        return runs[backend]

    return run


@pytest.mark.parametrize("backend", BACKENDS, ids=list(BACKENDS))
def test_two_processes_train_what_one_process_trains(backend, setup, two_processes):
    tmp, model, recipes, single = setup
    sharded = two_processes(backend)
    for name in METHODS:
        one, two = weights(single / name), weights(sharded / name)
        assert one.keys() == two.keys(), name
        trained_weights(name, one, model)
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-3, msg=f"{backend} {name} {key}")
        logs = [json.loads((out / name / "log_history.json").read_text()) for out in (single, sharded)]
        steps = [[row for row in log if "loss" in row and "train_runtime" not in row] for log in logs]
        assert len(steps[0]) == len(steps[1]) == 3
        assert [json.loads((out / name / "micro_batches.json").read_text()) for out in (single, sharded)] == [6, 6], name
        for row_one, row_two in zip(*steps):
            for term in TERMS:
                assert (term in row_one) == (term in row_two), (name, term)
                if term in row_one:
                    assert row_two[term] == pytest.approx(row_one[term], rel=1e-4, abs=1e-7), (backend, name, term)
        loaded = reload(name, sharded / name, model)
        saved = {k: v for k, v in two.items() if not k.startswith("reprpo_transforms")}
        assert loaded.keys() == saved.keys(), f"{backend} {name}: {sorted(loaded.keys() ^ saved.keys())[:4]}"
        for key in saved:
            torch.testing.assert_close(loaded[key], saved[key], atol=0, rtol=0, msg=f"reloaded {backend} {name} {key}")


def test_fsdp2_gradient_edits_equal_one_process(tmp_path, tokenizer):
    """Accelerate turns FSDP into DDP on CPU, so this applies torch's fully_shard itself on 2 gloo processes:
    gradients arrive as DTensors sharded on the output axis, and the projection must see the complete tensor."""
    from fsdp2_reference import BETA, batch, directions, lora_model

    from reprpo_trl.projection import project_output_axis

    out = tmp_path / "fsdp2.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29620",
           str(ROOT / "tests" / "fsdp2_harness.py"), str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = torch.load(out)
    model = lora_model(make_model(tokenizer))
    (sum(model(input_ids=batch(rank)).logits.float().pow(2).mean() for rank in (0, 1)) / 2).backward()
    params = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    us = directions(params)
    assert saved["grads"].keys() == params.keys()
    for name, p in params.items():
        expected = project_output_axis(p.grad, us[name], BETA, renorm=True)
        scale = p.grad.abs().max()
        assert (expected - p.grad).abs().max() > 0.1 * scale, "the edit changed nothing"
        torch.testing.assert_close(saved["grads"][name], expected, atol=1e-5 * scale, rtol=1e-4, msg=name)
    assert torch.equal(saved["written"], torch.full_like(saved["written"], 0.25))


@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp2"])
def test_sharded_checkpoint_resumes_to_the_uninterrupted_result(backend, setup, two_processes):
    """DeepSpeed and FSDP2 write their own checkpoints (engine, parameter and optimizer partitions; sharded state
    dicts); the transforms live in the model, so they come back with it. The matrix's runs save a checkpoint after
    2 of their 3 steps: ReprPO with a trained transform and full fine-tuning, resumed from it in a fresh output
    directory, end where the run in one go ended and log what it logged."""
    tmp, _, _, _ = setup
    straight, resumed = two_processes(backend), tmp / f"resume_{backend}"
    names = ("reprpo-ether", "reprpo-full")
    own = "pytorch_model_fsdp_0" if backend == "fsdp2" else "global_step"  # FSDP's sharded state dict, DeepSpeed's
    for name in names:
        checkpoint = straight / name / "checkpoint-2"
        assert (checkpoint / "reprpo_checkpoint.json").exists(), name
        assert any(p.name.startswith(own) for p in checkpoint.iterdir()), name
        shutil.copytree(checkpoint, resumed / name / "checkpoint-2")
    port = 29640 + list(BACKENDS).index(backend)
    launch(tmp, resumed.name, 2, BACKENDS[backend], [tmp / f"{n}.yaml" for n in names], port, "--resume_from_checkpoint", "auto")
    for name in names:
        logs = [json.loads((out / name / "log_history.json").read_text()) for out in (straight, resumed)]
        rows = [[row for row in log if "loss" in row and "train_runtime" not in row] for log in logs]
        assert [row["step"] for row in rows[1]] == [1, 2, 3], f"{name}: the resumed run's log history"
        assert json.loads((resumed / name / "micro_batches.json").read_text()) == 2, f"{name}: not resumed at step 3"
        for row_one, row_two in zip(*rows):
            for term in set(TERMS) & row_one.keys():
                assert row_two[term] == pytest.approx(row_one[term], rel=1e-5, abs=1e-7), (backend, name, term)
        one, two = weights(straight / name), weights(resumed / name)
        assert one.keys() == two.keys() and any("transforms" in k or "model.safetensors" in k for k in one)
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0, msg=f"{backend} {name} {key}")


def test_a_launch_that_forms_no_world_is_refused(tmp_path, setup):
    """The shipped DDP config asks for GPUs; on a machine without them each process would believe it is alone (a
    recipe with use_cpu: true forms the world on CPU instead)."""
    _, _, recipes, _ = setup
    recipe = {k: v for k, v in yaml.safe_load(recipes[2].read_text()).items() if k != "use_cpu"}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", "29650", "-m", "reprpo_trl.train", "--config", str(path),
           "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    assert "error: the launcher started 2 processes, but each sees a world of 1" in result.stderr
    assert "use_cpu: true" in result.stderr and not (tmp_path / "out").exists()


def test_full_fine_tuning_that_zero3_cannot_save_is_refused_before_training(tmp_path, setup):
    """Without zero3_save_16bit_model the Trainer would write DeepSpeed shards instead of a loadable model, after
    the whole run; the run stops at start-up instead, with exit code 2 and nothing trained."""
    tmp, _, recipes, _ = setup
    recipe = {**yaml.safe_load(recipes[1].read_text()), "adapter": {"type": "full"}}
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(recipe))
    config = tmp_path / "zero3.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "num_processes": 2, "num_machines": 1, "machine_rank": 0,
        "mixed_precision": "no", "use_cpu": True, "main_process_ip": "127.0.0.1", "main_process_port": 29651,
        "distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True},  # no 16-bit save
    }))  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "reprpo_trl.train",
           "--config", str(path), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode != 0
    assert "full fine-tuning under DeepSpeed ZeRO-3 without zero3_save_16bit_model" in result.stderr
    assert not (tmp_path / "out").exists()
