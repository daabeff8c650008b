"""Callbacks that record training dynamics into `<output_dir>/dynamics/`: weight statistics and the LLC.

A measurement is taken at the end of an optimizer step (after the update) when the step is a save or evaluation
step, or a multiple of `every` (> 0), and always at the last step. It is written once the step's logs exist (at
the next step's end, or when training ends), joined with the latest train loss terms and eval metrics
(`step_metrics`). Only the main process writes, every table rewritten atomically; weight statistics are measured
on it alone, the LLC on every process (the trainer's loss gathers metrics across processes, which would hang if
only one process ran it).
"""

import contextlib
import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from ..errors import InputError
from ..io import read_table, write_table
from ..sites import unwrap
from .llc import LLCArguments, probe_batches, trainer_llc
from .plots import plot_llc
from .stats import weight_statistics

DYNAMICS_DIR = "dynamics"


def _is_train_metric(key: str) -> bool:
    return key == "loss" or key.startswith("loss/") or "accurac" in key


def step_metrics(log_history: list[dict], step: int) -> dict[str, float]:
    """The latest train log at or before `step` (loss, each `loss/*` term, accuracies) and the latest eval log
    (eval_loss, eval_loss/*, eval accuracies), with the steps they were logged at (`loss_step`, `eval_step`)."""
    train = [e for e in log_history if "loss" in e and e.get("step", 0) <= step]
    evals = [e for e in log_history if "eval_loss" in e and e.get("step", 0) <= step]
    row = {}
    if train:
        row.update({k: v for k, v in train[-1].items() if _is_train_metric(k)}, loss_step=train[-1]["step"])
    if evals:
        row.update({k: v for k, v in evals[-1].items() if k.startswith("eval_") and _is_train_metric(k[5:])})
        row["eval_step"] = evals[-1]["step"]
    return row


def refuse_sharded_parameters(trainer, what: str) -> None:
    """Statistics of whole parameters on one process are wrong when FSDP or DeepSpeed ZeRO-3 shards them."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3):
        raise InputError(
            f"{what} reads whole parameters on the main process, but FSDP / DeepSpeed ZeRO-3 shards them: "
            "use DDP or ZeRO-1/2, or compute it offline from saved checkpoints with reprpo-dynamics"
        )


class _StepTable(TrainerCallback):
    """One row per measured step in `<output_dir>/dynamics/<name>.parquet` (+ .csv)."""

    name = ""
    all_processes = False  # measure on every process (the measurement runs collectives), write on the main one

    def __init__(self, trainer, every: int = 0):
        if every < 0:
            raise InputError(f"{type(self).__name__}: every={every} must be >= 0 (0: save and eval steps only)")
        self.trainer, self.every = trainer, every
        self.path = Path(trainer.args.output_dir) / DYNAMICS_DIR / f"{self.name}.parquet"
        self.rows, self.pending = [], None

    def measure(self, model, state) -> dict:
        raise NotImplementedError

    def on_train_begin(self, args, state, control, **kwargs):
        refuse_sharded_parameters(self.trainer, type(self).__name__)
        self.rows, self.pending = [], None
        if self.path.exists() and state.global_step > 0:  # resuming: keep what the earlier steps recorded
            earlier = read_table(self.path)
            self.rows = earlier[earlier.step <= state.global_step].to_dict("records")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._flush(state)
        due = (self.every and state.global_step % self.every == 0) or control.should_save or control.should_evaluate
        if not (due or state.global_step >= state.max_steps):
            return
        if state.is_world_process_zero or self.all_processes:
            started = time.perf_counter()
            row = self.measure(unwrap(model), state)
            if state.is_world_process_zero:
                self.pending = {"step": state.global_step, "epoch": state.epoch, **row,
                                "seconds": time.perf_counter() - started}  # fmt: skip

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(state)

    def _flush(self, state):
        if self.pending is None:
            return
        self.rows.append({**self.pending, **step_metrics(state.log_history, self.pending["step"])})
        self.pending = None
        self.write(pd.DataFrame(self.rows))

    def write(self, table: pd.DataFrame):
        write_table(table, self.path)


class WeightStatsCallback(_StepTable):
    """The weight statistics of the trained matrices (reprpo_trl.dynamics.stats) -> dynamics/weight_stats."""

    name = "weight_stats"

    def measure(self, model, state) -> dict:
        return weight_statistics(model)


@contextlib.contextmanager
def untouched(trainer):
    """Leave training exactly as it was: every RNG state (python, numpy, torch CPU and CUDA), the trainable
    parameters and their gradients, the model's train/eval mode and the trainer's pending metrics."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)  # fmt: skip
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    values = [p.detach().clone() for p in trainable]
    grads = [None if p.grad is None else p.grad.clone() for p in trainable]
    metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
    was_training = trainer.model.training
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        with torch.no_grad():
            for p, value, grad in zip(trainable, values, grads):
                p.copy_(value)
                p.grad = grad
        if metrics is not None:
            trainer._metrics = metrics
        trainer.model.train(was_training)


class LLCCallback(_StepTable):
    """The LLC (reprpo_trl.dynamics.llc) with the trainer's own loss on a fixed probe set -> dynamics/llc (one row
    per step), dynamics/llc_traces (every SGLD loss) and dynamics/llc.png (LLC against step beside the loss).
    Training continues bit-identically: see `untouched`."""

    name = "llc"
    all_processes = True  # the trainer's loss gathers its metrics across processes

    def __init__(self, trainer, args: LLCArguments, every: int = 0):
        super().__init__(trainer, every)
        self.args = args
        self.batches = None
        self.traces = []

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        traces = self.path.with_name("llc_traces.parquet")
        self.traces = [read_table(traces).query(f"step <= {state.global_step}")] if self.rows and traces.exists() else []

    def measure(self, model, state) -> dict:
        with untouched(self.trainer):
            if self.batches is None:
                self.batches = probe_batches(self.trainer, self.args)
            summary, trace = trainer_llc(self.trainer, self.batches, self.args)
        self.traces.append(trace.assign(step=state.global_step))
        return {**summary, "epsilon": self.args.llc_epsilon, "gamma": self.args.llc_gamma}

    def write(self, table: pd.DataFrame):
        super().write(table)
        write_table(pd.concat(self.traces, ignore_index=True), self.path.with_name("llc_traces"))
        losses = pd.DataFrame([e for e in self.trainer.state.log_history if "loss" in e], columns=["step", "loss"])
        plot_llc({Path(self.trainer.args.output_dir).name: (losses, table)}, self.path.with_suffix(".png"))


@dataclass
class DynamicsArguments(LLCArguments):
    """Recipe keys that turn the dynamics callbacks on (reprpo-train; RunArguments inherits them)."""

    weight_stats: bool = field(
        default=False, metadata={"help": "Record weight statistics to <output_dir>/dynamics/weight_stats.parquet."}
    )
    weight_stats_steps: int = field(
        default=0, metadata={"help": "Also every this many steps (0: only at save and eval steps and the last step)."}
    )
    llc: bool = field(default=False, metadata={"help": "Estimate the LLC into <output_dir>/dynamics/llc.parquet."})
    llc_steps: int = field(
        default=0, metadata={"help": "Also every this many steps (0: only at save and eval steps and the last step)."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("weight_stats_steps", "llc_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"{name}={getattr(self, name)} must be >= 0 (0: save and eval steps only)")


def attach_dynamics(trainer, args: DynamicsArguments):
    """Add the callbacks `args` turns on to `trainer`; return the trainer."""
    if args.weight_stats:
        trainer.add_callback(WeightStatsCallback(trainer, every=args.weight_stats_steps))
    if args.llc:
        trainer.add_callback(LLCCallback(trainer, args, every=args.llc_steps))
    return trainer
