"""`accelerate launch -m reprpo_trl.train`: one process, and two CPU processes (gloo DDP), on a tiny model. Equality
with one process under DDP and DeepSpeed is tests/test_distributed.py."""

import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.mark.parametrize("outcome", ["finished", "stopped", "failed"])
def test_train_command_closes_the_process_group_once_every_rank_ended(outcome, tmp_path, monkeypatch):
    """Left to the interpreter's exit, gloo's worker threads can abort a run that finished (SIGABRT, "terminate
    called without an active exception", seen in CI under ZeRO-3): `reprpo train` destroys the process group after a
    finished run and after a stop every rank agreed on, and leaves it after a failure, where a rank may still be
    inside a collective and destroying it could hang."""
    import torch.distributed as dist

    from reprpo_trl import train
    from reprpo_trl.cli import train as train_cli
    from reprpo_trl.errors import RunError, Stopped

    def run(argv):
        if outcome != "finished":
            raise (Stopped if outcome == "stopped" else RunError)(outcome)

    monkeypatch.setattr(train, "parse_args", lambda argv: (None, SimpleNamespace(output_dir=str(tmp_path)), None, None))
    monkeypatch.setattr(train, "run", run)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with contextlib.nullcontext() if outcome == "finished" else pytest.raises(SystemExit):
            train_cli.main(["--config", "r.yaml"])
        assert dist.is_initialized() == (outcome == "failed")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


def test_multinode_template_renders_the_launch_and_requeues_a_stopped_run(tmp_path):
    """slurm/train_multinode.sbatch with srun, scontrol and accelerate stubbed: the launch command carries slurm's
    node count, rank and rendezvous host; a USR1 to the script (what `--signal=B:USR1@300` sends) touches the stop
    file, and a run that stopped before its end is requeued."""
    import os
    import signal
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "srun": 'shift; SLURM_NODEID=0 exec "$@"',  # drop --kill-on-bad-exit, run the task as node 0
        "scontrol": f'if [ "$1" = show ]; then printf "gpu-a\\ngpu-b\\n"; else echo "$@" > {tmp_path}/scontrol; fi',
        # training: record the command, wait for the stop file, then leave what a stopped run leaves
        "accelerate": f'echo "$@" > {tmp_path}/launched; out="$(echo "$@" | sed "s/.*--output_dir \\([^ ]*\\).*/\\1/")"; '
                      'for i in $(seq 200); do [ -f "$out/reprpo_stop" ] && break; sleep 0.05; done; '
                      'echo "{}" > "$out/reprpo_stopped.json"',
    }  # fmt: skip
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu-[a-b]"}  # fmt: skip
    out = tmp_path / "out"
    script = ROOT / "slurm" / "train_multinode.sbatch"
    job = subprocess.Popen(["bash", str(script), "r.yaml", str(out), "accelerate_configs/zero2.yaml", "--seed", "3"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for _ in range(200):
        if (tmp_path / "launched").exists():
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=60)
    assert job.returncode == 0, log
    launched = (tmp_path / "launched").read_text().split()
    assert " ".join(launched) == (
        "launch --config_file accelerate_configs/zero2.yaml --num_machines 2 --num_processes 8 --machine_rank 0 "
        f"--main_process_ip gpu-a --main_process_port 29500 -m reprpo_trl.train --config r.yaml --output_dir {out} "
        "--resume_from_checkpoint auto --seed 3"
    )
    assert (out / "reprpo_stop").exists() and "stop requested" in log
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "77"]
    assert (tmp_path / "logs").is_dir()
