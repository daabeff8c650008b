"""What every reprpo_trl trainer adds to its TRL parent: loss terms logged once per optimizer step, a guard
against non-finite values, and checkpoints that say when they are complete (reprpo_trl.checkpoints).

Terms. `record(name, value, reduce)` keeps each micro-batch's 0-d tensor on the device. After the last
micro-batch of an optimizer step, its terms, its loss and its gradient norm are gathered across processes as one
tensor and moved to the host once:
    term = mean over the step's micro-batches      reduce="mean": per-micro-batch means (loss/dpo, hidden/*)
    term = sum over the step's micro-batches       reduce="sum": already divided by the step's token count (ia2/*)
Guard, `on_nonfinite`:
    stop  raise RunError naming the step and the first non-finite term, before the optimizer step (default)
    skip  drop the step's gradients, so the optimizer leaves every parameter as it was, and count the step
    off   no check
Under DeepSpeed the engine steps inside backward, so there the check comes after the step; it still comes before
any save, and `save_model` refuses to write non-finite trainable parameters unless the guard is off.
"""

import math
from dataclasses import field

import torch
from transformers.utils import logging

from ..checkpoints import CheckpointMarker, last_complete_checkpoint, resolve_resume
from ..errors import InputError, RunError

NONFINITE_POLICIES = ("stop", "skip", "off")
logger = logging.get_logger(__name__)


def nonfinite_field():
    """The `on_nonfinite` config field, shared by every trainer config."""
    return field(
        default="stop",
        metadata={
            "help": f"At a non-finite loss term or gradient norm, one of {NONFINITE_POLICIES}: stop training with an "
            "error naming the step and the term (nothing of that step is saved), skip the step (no parameter "
            "changes; counted as nonfinite/skipped_steps), or off."
        },
    )


def check_nonfinite_policy(value: str) -> None:
    if value not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite={value!r}: choose one of {NONFINITE_POLICIES}")


class GuardedTrainer:
    """Mixin placed before a TRL trainer class; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_terms: dict[str, list[torch.Tensor]] = {}
        self._term_reduce: dict[str, str] = {}
        self._step_losses: list[torch.Tensor] = []
        self.skipped_steps = 0
        self.add_callback(CheckpointMarker())
        if self.nonfinite_policy == "skip" and self.is_deepspeed_enabled:
            raise InputError(
                "on_nonfinite=skip cannot run under DeepSpeed: its engine applies the optimizer step inside backward, "
                "before the trainer sees the gradient norm. Use on_nonfinite=stop (the default)."
            )

    @property
    def nonfinite_policy(self) -> str:
        return getattr(self.args, "on_nonfinite", "stop")

    def record(self, name: str, value: torch.Tensor, reduce: str = "mean") -> None:
        """One micro-batch's value (a 0-d tensor on this process) of a logged term; see the module docstring."""
        value = value.detach().float().reshape(())
        if not self.model.training:
            self._metrics["eval"][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).mean().item())
            return
        self.step_terms.setdefault(name, []).append(value)
        self._term_reduce[name] = reduce

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(loss.detach().float().reshape(()))
        if self.accelerator.sync_gradients:
            self.edit_gradients()
            self._end_step()
        return loss

    def edit_gradients(self) -> None:
        """Called once per optimizer step with the step's complete (all-reduced) gradient, before the guard,
        clipping and the optimizer. Does nothing here; ProjGrad projects the gradient."""

    def gradient_norm(self) -> torch.Tensor:
        """The L2 norm of every parameter gradient of the step, before clipping."""
        if self.is_deepspeed_enabled:  # the engine has stepped already and kept the norm it clipped with
            norm = self.model_wrapped.get_global_grad_norm()
            return torch.as_tensor(0.0 if norm is None else float(norm), device=self.accelerator.device)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _end_step(self) -> None:
        names = list(self.step_terms)
        values = [
            torch.stack(v).sum() if self._term_reduce[n] == "sum" else torch.stack(v).mean()
            for n, v in self.step_terms.items()
        ]
        checked = names + ["loss"]
        values.append(torch.stack(self._step_losses).sum())
        if self.nonfinite_policy != "off":
            checked.append("grad_norm")
            values.append(self.gradient_norm())
        self.step_terms, self._step_losses = {}, []
        stacked = torch.stack([v.to(self.accelerator.device) for v in values])
        host = self.accelerator.gather(stacked).reshape(-1, len(values)).mean(0).tolist()  # the step's one sync
        for name, value in zip(names, host):
            self._metrics["train"][name].append(value)
        bad = [(name, value) for name, value in zip(checked, host) if not math.isfinite(value)]
        if bad and self.nonfinite_policy != "off":
            self._on_nonfinite(bad)

    def _on_nonfinite(self, bad: list[tuple[str, float]]) -> None:
        step = self.state.global_step + 1
        listed = ", ".join(f"{name} = {value}" for name, value in bad)
        if self.nonfinite_policy == "skip":
            for parameter in self.model.parameters():
                parameter.grad = None
            self.skipped_steps += 1
            self._metrics["train"]["nonfinite/skipped_steps"].append(self.skipped_steps)
            logger.warning(f"step {step}: non-finite {listed}; step skipped, no parameter changed ({self.skipped_steps} so far)")
            return
        last = last_complete_checkpoint(self.args.output_dir)
        raise RunError(
            f"step {step}: non-finite {listed}. Training stopped before this step was applied or saved; the last "
            f"complete checkpoint is {str(last) if last else 'none'}. Lower the learning rate or the loss weights, "
            "or set on_nonfinite=skip to skip such steps."
        )

    def save_model(self, output_dir=None, _internal_call=False):
        if self.nonfinite_policy != "off":
            self._refuse_nonfinite_parameters()
        super().save_model(output_dir, _internal_call)

    @torch.no_grad()
    def _refuse_nonfinite_parameters(self) -> None:
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and p.numel()]
        if not trainable or bool(torch.stack([torch.isfinite(p).all() for _, p in trainable]).all()):
            return
        names = [n for n, p in trainable if not bool(torch.isfinite(p).all())]
        raise RunError(
            f"step {self.state.global_step}: trainable parameter(s) {names[:3]}{' ...' if len(names) > 3 else ''} are "
            "non-finite; refusing to save them. Lower the learning rate or the loss weights."
        )

    def train(self, resume_from_checkpoint=None, **kwargs):
        """TRL's train, resuming only from a complete checkpoint (reprpo_trl.checkpoints.resolve_resume)."""
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self.load_extra_state(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def load_extra_state(self, checkpoint: str | None) -> None:
        """What a subclass keeps beside the model in a checkpoint (ReprPO: its transforms); nothing here."""
