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
Under DeepSpeed, whose engine steps inside backward, the trainer's step work (gradient edits, terms, the check)
runs between the engine's backward and its step; the engine's gradient norm is known only after its step, so a
non-finite norm stops training there, still before any save. `save_model` refuses to write non-finite trainable
parameters unless the guard is off.

Gradient checkpointing: trainers that read hooked states with gradient (`reads_hooked_states`) checkpoint
non-reentrantly (transformers' default), where a checkpointed layer's first forward records autograd. The reentrant
form runs it under no_grad, so a state read by a hook inside the layer (side sites, adapted modules, attention
outputs) would silently carry no gradient; hooks on a decoder layer itself run outside its checkpoint, but one mode
for every site is simpler and costs nothing. TRL forces reentrant for PEFT under ZeRO-3 to work around a DeepSpeed
recompute bug that DeepSpeed 0.19.8 fixed; these trainers undo that.
"""

import contextlib
import math
from dataclasses import field

import torch
from accelerate.utils.deepspeed import DeepSpeedEngineWrapper
from peft import PeftModel
from transformers.utils import logging

from .. import sharding
from ..checkpoints import CheckpointMarker, StopAndSave, last_complete_checkpoint, resolve_resume
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

    reads_hooked_states = False  # True where losses or edits need the gradient of states read by forward hooks

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if self.reads_hooked_states and config is not None and config.gradient_checkpointing:
            if (config.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
                raise InputError(
                    f"{type(self).__name__} with gradient_checkpointing_kwargs use_reentrant=True: reentrant checkpointing "
                    "runs each layer's first forward without autograd, so the states this trainer reads would carry no "
                    "gradient. Remove use_reentrant (the non-reentrant default is used)."
                )
        super().__init__(*args, **kwargs)
        if self.reads_hooked_states and self.args.gradient_checkpointing:
            _non_reentrant_checkpointing(self.args)
        self.step_terms: dict[str, list[torch.Tensor]] = {}
        self._term_reduce: dict[str, str] = {}
        self._step_losses: list[torch.Tensor] = []
        self.skipped_steps = 0
        self.stop_and_save = StopAndSave()
        self.add_callback(self.stop_and_save)
        self.add_callback(CheckpointMarker())  # after StopAndSave: its on_save marks the checkpoint a stop asked for
        if self.nonfinite_policy == "skip" and self.is_deepspeed_enabled:
            raise InputError(
                "on_nonfinite=skip cannot run under DeepSpeed: its engine applies the optimizer step inside backward, "
                "before the trainer sees the gradient norm. Use on_nonfinite=stop (the default)."
            )
        self._refuse_unsavable_zero3()

    def _refuse_unsavable_zero3(self) -> None:
        """Under ZeRO-3 a full model is saved loadable only if DeepSpeed gathers its 16-bit weights at save time;
        otherwise the Trainer falls back to a DeepSpeed checkpoint, found out only after training (peft adapters
        are gathered either way)."""
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        if plugin is None or plugin.zero_stage != 3 or isinstance(self.model, PeftModel):
            return
        if not plugin.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save"):
            raise InputError(
                "full fine-tuning under DeepSpeed ZeRO-3 without zero3_save_16bit_model: the final model would be "
                "written as DeepSpeed shards, not loadable with from_pretrained. Set zero3_save_16bit_model: true "
                "under deepspeed_config in the accelerate config (accelerate_configs/zero3.yaml has it)."
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
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None and not isinstance(engine, _GuardedEngine):
            self.accelerator.deepspeed_engine_wrapped = _GuardedEngine(engine.engine, self)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.is_deepspeed_enabled:
            self._step_losses.append(loss.detach().float().reshape(()))
            if self.accelerator.sync_gradients:
                self.before_optimizer_step()
        return loss

    def before_optimizer_step(self) -> None:
        """After the step's last backward, before clipping and the optimizer (under DeepSpeed: the engine's step)."""
        self.edit_gradients()
        self._end_step(None if self.is_deepspeed_enabled else self.gradient_norm())

    def edit_gradients(self) -> None:
        """Called once per optimizer step with the step's complete (all-reduced) gradient, before the guard,
        clipping and the optimizer. Does nothing here; ProjGrad projects the gradient (reprpo_trl.sharding)."""

    def gradient_norm(self) -> torch.Tensor:
        """The L2 norm of every parameter gradient of the step, before clipping (not under DeepSpeed)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _end_step(self, grad_norm: torch.Tensor | None) -> None:
        names = list(self.step_terms)
        values = [
            torch.stack(v).sum() if self._term_reduce[n] == "sum" else torch.stack(v).mean()
            for n, v in self.step_terms.items()
        ]
        checked = names + ["loss"]
        values.append(torch.stack(self._step_losses).sum())
        if self.nonfinite_policy != "off" and grad_norm is not None:
            checked.append("grad_norm")
            values.append(grad_norm)
        values.append(torch.tensor(float(self.stop_and_save.requested())))  # does any process want to stop?
        self.step_terms, self._step_losses = {}, []
        stacked = torch.stack([v.to(self.accelerator.device) for v in values])
        host = self.accelerator.gather(stacked).reshape(-1, len(values)).mean(0).tolist()  # the step's one sync
        self.stop_and_save.agreed = host.pop() > 0
        for name, value in zip(names, host):
            self._metrics["train"][name].append(value)
        bad = [(name, value) for name, value in zip(checked, host) if not math.isfinite(value)]
        if bad and self.nonfinite_policy != "off":
            self._on_nonfinite(bad)

    def after_engine_step(self) -> None:
        """DeepSpeed: the gradient norm the engine clipped with, checked once it is known."""
        norm = self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        if self.nonfinite_policy != "off" and norm is not None and not math.isfinite(norm):
            self._on_nonfinite([("grad_norm", norm)])

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
        with self._full_weights():
            super().save_model(output_dir, _internal_call)

    @contextlib.contextmanager
    def _full_weights(self):
        """Under FSDP with a sharded state dict the Trainer writes no model or adapter at all (its checkpoints keep
        only shards): save gathered, loadable weights too. The shards stay for resuming."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            yield
            return
        sharded = plugin.state_dict_type
        plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            yield
        finally:
            plugin.set_state_dict_type(sharded)

    @torch.no_grad()
    def _refuse_nonfinite_parameters(self) -> None:
        """Every rank checks its own shard; the count of non-finite tensors is summed over ranks (one sync)."""
        trainable = [(n, sharding.local(p)) for n, p in self.model.named_parameters() if p.requires_grad]
        finite = [torch.isfinite(p).all() if p.numel() else torch.ones((), dtype=torch.bool, device=p.device) for _, p in trainable]
        if not finite:
            return
        flags = torch.stack(finite).to(self.accelerator.device)
        if self.accelerator.reduce((~flags).sum(), "sum").item() == 0:
            return
        names = [n for (n, _), ok in zip(trainable, flags.tolist()) if not ok]
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


def _non_reentrant_checkpointing(args) -> None:
    """Undo TRL's reentrant workaround for PEFT + ZeRO-3 (see the module docstring), on both names it reads."""
    if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
        import deepspeed
        from packaging.version import Version

        if Version(deepspeed.__version__) < Version("0.19.8"):
            raise InputError(
                f"gradient checkpointing under ZeRO-3 needs deepspeed>=0.19.8 (found {deepspeed.__version__}), which "
                "fixed the non-reentrant recompute; upgrade it, or set gradient_checkpointing: false"
            )
    kwargs = {**(args.activation_checkpointing_kwargs or {}), **(args.gradient_checkpointing_kwargs or {}), "use_reentrant": False}
    args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs


class _GuardedEngine(DeepSpeedEngineWrapper):
    """accelerate's DeepSpeed engine wrapper with the trainer's step work between the engine's backward and step."""

    def __init__(self, engine, trainer: GuardedTrainer):
        super().__init__(engine)
        self.trainer = trainer

    def backward(self, loss, sync_gradients=True, **kwargs):
        self.trainer._step_losses.append(loss.detach().float().reshape(()))
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)
        if sync_gradients:
            self.trainer.before_optimizer_step()
            self.engine.step()
            self.trainer.after_engine_step()
