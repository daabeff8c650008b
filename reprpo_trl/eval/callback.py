"""Generalisation curves during training: the shift evaluation every N steps, logged to the trainer's loggers."""

import torch
from transformers import Trainer, TrainerCallback

from ..errors import InputError
from ..sites import as_base
from .preference import evaluate_shifts, load_shifts


class ShiftEvalCallback(TrainerCallback):
    """Every `every` optimizer steps, log per shift (averaged over its datasets, first `n` pairs each):
    `shift/<shift>/acc` and `shift/<shift>/nll_ratio` (NLL of chosen completions relative to the base model: the
    peft model with its adapter disabled, or, for full fine-tuning, the model as this `train()` call starts).

    The model runs without gradients in eval mode and is put back as it was; RNG states are restored, so
    training continues exactly as without the callback. Every process evaluates (a sharded model needs all
    of them); only the main one logs.
    """

    def __init__(self, trainer, shifts: dict[str, list[str]], every: int, n: int = 32, batch_size: int = 16, seed: int = 0):
        if every < 1:
            raise InputError(f"ShiftEvalCallback: every={every} must be a positive number of steps")
        self.trainer, self.every, self.batch_size = trainer, every, batch_size
        self.data = load_shifts(shifts, n=n, seed=seed)
        self.base_nll = None

    def _evaluate(self, model):
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            table = evaluate_shifts(model, self.trainer.processing_class, self.data, batch_size=self.batch_size)
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        return table

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        with as_base(model):
            self.base_nll = self._evaluate(model).set_index("fingerprint").nll_chosen

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        table = self._evaluate(model)
        table["nll_ratio"] = table.nll_chosen / table.fingerprint.map(self.base_nll)
        per_shift = table.groupby("shift", sort=False)[["acc", "nll_ratio"]].mean()
        logs = {f"shift/{shift}/{name}": float(value) for shift, row in per_shift.iterrows() for name, value in row.items()}
        should_log = control.should_log  # on_log clears it, which would drop this step's training log
        Trainer.log(self.trainer, logs)  # the base log: leaves the trainer's own running metrics alone
        self.trainer.control.should_log = control.should_log = should_log
