"""What a run guarantees (docs/reliability.md): trained transforms get fresh gradients every step, a resumed run
equals an uninterrupted one, half-written checkpoints are never resumed, non-finite values stop (or skip) a step
before anything is saved, and damaged caches are recomputed."""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import device_flags, make_model
from reprpo_trl import IA2Config, IA2Trainer, ProjBPConfig, ProjBPTrainer, ProjGradConfig, ProjGradTrainer, ReprPOConfig, ReprPOTrainer
from reprpo_trl.checkpoints import COMPLETE_MARKER, last_complete_checkpoint, resolve_resume
from reprpo_trl.errors import InputError, RunError
from reprpo_trl.icl import load_icl_task
from reprpo_trl.models import cache_dir
from reprpo_trl.train import run
from reprpo_trl.trainers import DPOConfig, DPOTrainer
from reprpo_trl.trainers.guard import GuardedTrainer

ROOT = Path(__file__).parents[1]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
COMMON = dict(per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none",
              logging_steps=1, save_strategy="no", seed=0)  # fmt: skip
DPO_LIKE = {
    "dpo": (DPOConfig, DPOTrainer, {}),
    "reprpo": (ReprPOConfig, ReprPOTrainer, {"layers": "1,2", "hidden_loss": "rank", "transform": "ether"}),
    "projgrad": (ProjGradConfig, ProjGradTrainer, {"proj_beta": 0.2}),
    "projbp": (ProjBPConfig, ProjBPTrainer, {"proj_beta": 0.2}),
}


def make_trainer(kind, tmp_path, tokenizer, pairs, lora=LORA, **overrides):
    settings = {**COMMON, "output_dir": str(tmp_path / "out"), **overrides}
    if kind == "ia2":
        examples, pool = load_icl_task("suite:sentiment", n=8, pool_size=16)
        args = IA2Config(**{"num_demos": 2, "target_cache_dir": str(tmp_path / "cache"), **settings})
        return IA2Trainer(make_model(tokenizer), args=args, train_dataset=examples, demo_pool=pool,
                          processing_class=tokenizer, peft_config=lora)  # fmt: skip
    config_class, trainer_class, fields = DPO_LIKE[kind]
    args = config_class(**{**fields, **settings})
    return trainer_class(make_model(tokenizer), args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


# --- trained transforms: fresh gradients every step -------------------------------------------------------------


@pytest.mark.parametrize("transform", ["ether", "hra"])
def test_trained_transform_equals_a_hand_written_loop(transform, tmp_path, tokenizer, pairs):
    """Three SGD steps of 2 micro-batches, by the Trainer and by a loop that zeroes every gradient it optimizes.
    Before the transforms lived inside the model, their gradient was a running sum over all past steps."""
    steps, accumulation = 3, 2
    settings = dict(transform=transform, max_steps=steps, gradient_accumulation_steps=accumulation, optim="sgd",
                    learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0, alpha=1e3)  # fmt: skip
    data = pairs.select(range(8))  # one optimizer step sees all 8 pairs: the order within it changes nothing
    # a random LoRA B puts the policy away from the reference at once; at pi = ref no loss moves a transform
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trained = make_trainer("reprpo", tmp_path / "a", tokenizer, data, lora=lora, **settings)
    by_hand = make_trainer("reprpo", tmp_path / "b", tokenizer, data, lora=lora, **settings)
    start = trainable(trained)
    assert any("reprpo_transforms" in n for n in start) and start.keys() == trainable(by_hand).keys()
    trained.train()

    model = by_hand.model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loader = by_hand.get_train_dataloader()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for batch in loader:  # 2 micro-batches of 4
            (by_hand.compute_loss(model, by_hand._prepare_inputs(batch)) / accumulation).backward()
        optimizer.step()
    expected = trainable(by_hand)
    for name, value in trainable(trained).items():
        assert (value - start[name]).abs().max() > 1e-6, f"{name} did not train"
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)


# --- non-finite values -------------------------------------------------------------------------------------------


class PoisonAfterSave(TrainerCallback):
    """Sets one LoRA weight to NaN right after checkpoint `step` is written: the next step's loss is NaN."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            name, parameter = next((n, p) for n, p in self.trainer.model.named_parameters() if "lora_A" in n)
            parameter.data[0, 0] = float("nan")


@pytest.mark.parametrize("kind", ["dpo", "reprpo", "projgrad", "projbp", "ia2"])
def test_nonfinite_loss_stops_before_saving(kind, tmp_path, tokenizer, pairs):
    trainer = make_trainer(kind, tmp_path, tokenizer, pairs, max_steps=4, save_strategy="steps", save_steps=1)
    trainer.add_callback(PoisonAfterSave(trainer, 2))
    with pytest.raises(RunError, match=r"step 3: non-finite .*nan.*last complete checkpoint is .*checkpoint-2") as error:
        trainer.train()
    first_term = {"reprpo": "hidden/layer_1", "projgrad": "projgrad/parallel_fraction", "ia2": "ia2/tok"}.get(kind, "loss")
    assert f"non-finite {first_term} = nan" in str(error.value)
    out = tmp_path / "out"
    assert last_complete_checkpoint(out) == out / "checkpoint-2" and not (out / "checkpoint-3").exists()
    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_infinite_gradient_norm_stops_at_the_first_step(tmp_path, tokenizer, pairs):
    trainer = make_trainer("reprpo", tmp_path, tokenizer, pairs, alpha=1e30, max_steps=3, save_strategy="steps", save_steps=1)
    before = trainable(trainer)
    with pytest.raises(RunError, match=r"step 1: non-finite grad_norm = inf.*last complete checkpoint is none"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainable(trainer).items())  # the step was never applied
    assert not list((tmp_path / "out").glob("checkpoint-*"))


class HugeAlphaAtStep(TrainerCallback):
    def __init__(self, trainer, step):
        self.trainer, self.step, self.params = trainer, step, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.args.alpha = 1e30 if state.global_step + 1 == self.step else 1.0

    def on_step_end(self, args, state, control, **kwargs):
        self.params[state.global_step] = trainable(self.trainer)


def test_skip_leaves_the_parameters_and_counts(tmp_path, tokenizer, pairs):
    trainer = make_trainer("reprpo", tmp_path, tokenizer, pairs, max_steps=3, on_nonfinite="skip")
    watch = HugeAlphaAtStep(trainer, 2)
    trainer.add_callback(watch)
    trainer.train()
    assert all(torch.equal(watch.params[2][n], p) for n, p in watch.params[1].items())  # step 2 changed nothing
    assert any(not torch.equal(watch.params[3][n], p) for n, p in watch.params[2].items())  # step 3 trained again
    assert [row.get("nonfinite/skipped_steps") for row in trainer.state.log_history[:3]] == [None, 1, None]


def test_nonfinite_parameters_are_never_saved(tmp_path, tokenizer, pairs):
    class PoisonAtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            next(p for n, p in trainer.model.named_parameters() if "lora_B" in n).data.fill_(float("inf"))

    trainer = make_trainer("reprpo", tmp_path, tokenizer, pairs, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.add_callback(PoisonAtStepEnd())
    with pytest.raises(RunError, match=r"step 1: trainable parameter\(s\) \['base_model.*lora_B.*non-finite; refusing"):
        trainer.train()
    assert not (tmp_path / "out" / "checkpoint-1" / "adapter_model.safetensors").exists()


def test_guard_off_trains_through(tmp_path, tokenizer, pairs):
    trainer = make_trainer("reprpo", tmp_path, tokenizer, pairs, alpha=1e30, max_steps=2, on_nonfinite="off")
    trainer.train()
    assert math.isinf(trainer.state.log_history[0]["grad_norm"])
    with pytest.raises(ValueError, match="on_nonfinite='never'"):
        ReprPOConfig(output_dir=str(tmp_path), on_nonfinite="never", use_cpu=True, bf16=False)


# --- resume ------------------------------------------------------------------------------------------------------


def recipe(tmp_path, tiny, method: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": tiny, "adapter": {"type": "lora", "r": 4, "targets": "qv"}, "train_dataset": "suite:add_small:train",
        "max_train_samples": 8, "max_length": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 6, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "learning_rate": 0.05,
        "report_to": "none", "use_cpu": True, "bf16": False, "seed": 3, **method,
    }))  # fmt: skip
    return path


def harness(mode: str, step: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "kill_harness.py"), mode, str(step), *argv],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def final_weights(out: Path) -> dict:
    files = [f for f in ("adapter_model.safetensors", "reprpo_transforms.safetensors") if (out / f).exists()]
    return {f"{f}:{k}": v for f in files for k, v in load_file(out / f).items()}


RESUMED = {
    "reprpo-ether": {"trainer": "reprpo", "layers": "1,2", "hidden_loss": "rank", "transform": "ether"},
    "projgrad-update": {"trainer": "projgrad", "proj_beta": 0.2, "project_update": True, "optim": "adamw_torch"},
}


def count_micro_steps(monkeypatch) -> list:
    calls = []
    training_step = GuardedTrainer.training_step
    monkeypatch.setattr(GuardedTrainer, "training_step", lambda self, *a, **k: calls.append(1) or training_step(self, *a, **k))
    return calls


@pytest.mark.parametrize("method", RESUMED, ids=list(RESUMED))
def test_killed_run_resumes_to_the_uninterrupted_result(method, tmp_path, saved_model, monkeypatch):
    path = recipe(tmp_path, saved_model, RESUMED[method], "r")
    run(["--config", str(path), "--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    result = harness("after-checkpoint", 2, ["--config", str(path), "--output_dir", str(killed)])
    assert result.returncode == -9, result.stderr[-2000:]
    assert last_complete_checkpoint(killed) == killed / "checkpoint-2" and not (killed / "adapter_model.safetensors").exists()
    calls = count_micro_steps(monkeypatch)
    run(["--config", str(path), "--output_dir", str(killed), "--resume_from_checkpoint", "auto"])
    assert len(calls) == 4 * 2  # steps 3..6 of 2 micro-batches: it did not start again from step 0
    straight, again = final_weights(tmp_path / "straight"), final_weights(killed)
    assert straight.keys() == again.keys() and len(straight) > 8
    for key, value in straight.items():
        torch.testing.assert_close(again[key], value, atol=1e-6, rtol=0, msg=key)


def test_checkpoint_half_written_by_a_kill_is_passed_over(tmp_path, saved_model, capsys, monkeypatch):
    path = recipe(tmp_path, saved_model, RESUMED["reprpo-ether"], "r")
    out = tmp_path / "out"
    result = harness("during-save", 4, ["--config", str(path), "--output_dir", str(out)])
    assert result.returncode == -9, result.stderr[-2000:]
    half = out / "checkpoint-4"
    assert (half / "adapter_model.safetensors").exists() and not (half / COMPLETE_MARKER).exists()
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    assert "passing over incomplete checkpoint(s) ['checkpoint-4']" in capsys.readouterr().out
    with pytest.raises(InputError, match="checkpoint-4' is incomplete.*resume from .*checkpoint-2"):
        resolve_resume(str(half), out)
    calls = count_micro_steps(monkeypatch)
    run(["--config", str(path), "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert len(calls) == 4 * 2  # from checkpoint-2, not checkpoint-4
    run(["--config", str(path), "--output_dir", str(tmp_path / "straight")])
    straight = final_weights(tmp_path / "straight")
    for key, value in final_weights(out).items():
        torch.testing.assert_close(value, straight[key], atol=1e-6, rtol=0, msg=key)


def test_resume_values(tmp_path):
    assert resolve_resume(None, tmp_path) is None and resolve_resume("auto", tmp_path) is None
    with pytest.raises(InputError, match="holds no complete checkpoint; use `auto`"):
        resolve_resume("true", tmp_path)
    with pytest.raises(InputError, match="no such directory"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)


# --- caches ------------------------------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # overwrite bytes inside the tensor data, leaving the header intact
        path.write_bytes(data[:-64] + bytes(b ^ 0xFF for b in data[-64:]))


@pytest.mark.parametrize("how", ["truncated", "scribbled"])
def test_damaged_reference_state_cache_is_recomputed(how, tmp_path, tokenizer, pairs, monkeypatch):
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "cache"))
    settings = dict(layers="1,2", hidden_loss="mse", transform="none", precompute_ref_log_probs=True, max_steps=1)
    clean = make_trainer("reprpo", tmp_path / "a", tokenizer, pairs, **settings)
    (path,) = (cache_dir() / "ref_states").glob("*.safetensors")
    damage(path, how)
    with pytest.warns(UserWarning, match=f"cache file {path}"):
        again = make_trainer("reprpo", tmp_path / "b", tokenizer, pairs, **settings)
    assert again.train_dataset["ref_states"] == clean.train_dataset["ref_states"]
    with warnings.catch_warnings(record=True) as caught:  # rewritten whole: the third run trusts it
        warnings.simplefilter("always")
        make_trainer("reprpo", tmp_path / "c", tokenizer, pairs, **settings)
    assert not [w for w in caught if "cache file" in str(w.message)]


def test_reference_state_cache_is_found_from_any_output_dir(tmp_path, tokenizer, pairs, monkeypatch):
    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path / "cache"))
    settings = dict(layers="1,2", hidden_loss="mse", transform="none", precompute_ref_log_probs=True, max_steps=1)
    make_trainer("reprpo", tmp_path / "a", tokenizer, pairs, **settings)
    monkeypatch.setattr(ReprPOTrainer, "_reference_states", lambda *a: pytest.fail("recomputed the reference states"))
    make_trainer("reprpo", tmp_path / "elsewhere", tokenizer, pairs, **settings)
    with pytest.raises(pytest.fail.Exception):  # a different site is a different cache entry
        make_trainer("reprpo", tmp_path / "b", tokenizer, pairs, **{**settings, "layers": "1,3"})


@pytest.mark.parametrize("how", ["truncated", "scribbled"])
def test_damaged_ia2_target_cache_is_recomputed(how, tmp_path, tokenizer):
    first = make_trainer("ia2", tmp_path, tokenizer, None, max_steps=1)
    path = first.targets_path
    damage(path, how)
    with pytest.warns(UserWarning, match=f"cache file {path}"):
        again = make_trainer("ia2", tmp_path, tokenizer, None, max_steps=1)
    assert torch.equal(again.targets.acts, first.targets.acts) and torch.isfinite(again.targets.acts).all()


def test_cli_stops_a_diverging_run_with_one_line_and_exit_1(tmp_path, saved_model, capsys):
    from reprpo_trl.cli.train import main

    path = recipe(tmp_path, saved_model, {**RESUMED["reprpo-ether"], "alpha": 1e30}, "r")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: step 1: non-finite grad_norm = inf" in err[-1] and "Traceback" not in "\n".join(err)  # after a progress bar
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists() and not (tmp_path / "out" / "reprpo_run.json").exists()


# --- stop on request (preemption) ---------------------------------------------------------------------------------


def test_sigusr1_saves_a_checkpoint_then_resume_finishes_the_run(tmp_path, saved_model, monkeypatch):
    """What a cluster does before a time limit: SIGUSR1 to the training process. It finishes the step, writes a
    complete checkpoint and exits with 3; `--resume_from_checkpoint auto` then ends where an uninterrupted run ends."""
    import json
    import signal
    import time

    from reprpo_trl.checkpoints import STOPPED_RECORD

    path = recipe(tmp_path, saved_model, {**RESUMED["reprpo-ether"], "max_steps": 30, "save_steps": 10}, "r")
    out = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "reprpo_trl.train", "--config", str(path), "--output_dir", str(out), *device_flags()],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 240
    while not (out / "checkpoint-10" / COMPLETE_MARKER).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 3, err[-2000:]
    stopped = json.loads((out / STOPPED_RECORD).read_text())
    assert stopped["reason"] == "SIGUSR1" and 10 <= stopped["step"] < 30
    assert last_complete_checkpoint(out) == out / f"checkpoint-{stopped['step']}"
    assert f"error: stopped at step {stopped['step']} on SIGUSR1" in err and not (out / "adapter_model.safetensors").exists()
    calls = count_micro_steps(monkeypatch)
    run(["--config", str(path), "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert len(calls) == (30 - stopped["step"]) * 2
    run(["--config", str(path), "--output_dir", str(tmp_path / "straight")])
    straight = final_weights(tmp_path / "straight")
    for key, value in final_weights(out).items():
        torch.testing.assert_close(value, straight[key], atol=1e-6, rtol=0, msg=key)


def test_stop_file_ends_every_trainer_at_a_complete_checkpoint(tmp_path, tokenizer, pairs):
    from reprpo_trl.checkpoints import STOP_FILE

    class TouchStopFile(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                (tmp_path / "out" / STOP_FILE).touch()

    trainer = make_trainer("reprpo", tmp_path, tokenizer, pairs, max_steps=5)
    trainer.add_callback(TouchStopFile())
    trainer.train()
    assert trainer.stop_and_save.stopped_at == 2 and trainer.state.global_step == 2
    assert last_complete_checkpoint(tmp_path / "out") == tmp_path / "out" / "checkpoint-2"
    trainer.train(resume_from_checkpoint="auto")  # the stale stop file is cleared: the run finishes
    assert trainer.state.global_step == 5 and trainer.stop_and_save.stopped_at is None


@pytest.mark.parametrize("kind", ["reprpo", "projgrad", "projbp"])
def test_logging_adds_at_most_one_host_sync_per_step(kind, tmp_path, tokenizer, pairs):
    """Every term is logged (ReprPO: per site and per diagnostic), yet a step reads the device from the host at most
    once more than TRL's own DPOTrainer does (its metrics): the package's terms go to the host in one transfer."""
    import trl

    syncs = {}
    for name in ("trl", kind):
        if name == "trl":
            trainer = trl.DPOTrainer(make_model(tokenizer), args=trl.DPOConfig(output_dir=str(tmp_path / name), max_steps=2, **COMMON),
                                     train_dataset=pairs, processing_class=tokenizer, peft_config=LORA)  # fmt: skip
        else:
            trainer = make_trainer(kind, tmp_path, tokenizer, pairs, max_steps=2)
        counts = []

        class CountSyncs(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                counts.append(0)

        trainer.add_callback(CountSyncs())
        originals = {m: getattr(torch.Tensor, m) for m in ("item", "tolist", "__bool__", "__float__", "__int__")}

        def counting(method):
            def read(self, *args, **kwargs):
                if counts:
                    counts[-1] += 1
                return originals[method](self, *args, **kwargs)

            return read

        try:
            for method in originals:
                setattr(torch.Tensor, method, counting(method))
            trainer.train()
        finally:
            for method, original in originals.items():
                setattr(torch.Tensor, method, original)
        syncs[name] = counts[-1]  # the second step: no first-step set-up
        logged = trainer.state.log_history[-2]
    assert syncs[kind] <= syncs["trl"] + 1, syncs
    if kind == "reprpo":
        assert {"hidden/layer_1", "hidden/layer_2", "hidden/proj", "hidden/rank_margin", "loss/dpo"} <= logged.keys()
