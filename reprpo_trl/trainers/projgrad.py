"""ProjGrad: DPO whose gradient is projected, once per optimizer step, onto the reference's preference direction.

For every adapted module m, forward hooks pool its output for the policy and the reference; the step's direction
is u_m = unit(sum over the step's examples of r_c - r_r), accumulated over gradient-accumulation micro-batches and
summed across processes. Before clipping, every trainable tensor with an output axis (LoRA B, a full weight, an
IA3 output scale) gets G' = G_par + beta * G_perp along u_m (see `reprpo_trl.projection`). With `project_update`
the parameter change the optimizer made is split the same way, which keeps the update in span(u_m) for Adam too.

Backends: the edit runs on the complete, all-reduced gradient after the step's last backward and before
clipping and the optimizer: DDP's gradient, FSDP2's DTensor shards gathered and written back, DeepSpeed's fp32
gradient partitions through its safe_* API, between the engine's backward and step (reprpo_trl.sharding).
"""

from dataclasses import dataclass, field

import torch

from ..projection import adapted_modules, output_axis_parameters, project_output_axes, unit
from .. import sharding
from ..sites import POOLINGS, StateCollector, unwrap
from .backends import require_config
from .dpo import DPOConfig, DPOTrainer

DIRECTION_SOURCES = ("reference", "policy")


@dataclass
class GradientProjectionConfig(DPOConfig):
    """Fields shared by ProjGrad and ProjBP. Every field is a YAML key and a CLI flag."""

    proj_beta: float = field(
        default=0.0,
        metadata={"help": "Weight beta of the gradient component orthogonal to the preference direction (1 = DPO)."},
    )
    renorm: bool = field(default=False, metadata={"help": "Rescale each edited gradient to its original norm."})
    direction_source: str = field(
        default="reference",
        metadata={"help": f"Whose pooled module outputs give the direction r_c - r_r: one of {DIRECTION_SOURCES}."},
    )
    proj_modules: str | None = field(
        default=None, metadata={"help": "Regex narrowing the adapted modules that are projected (default: all)."}
    )
    pooling: str = field(
        default="completion_mean", metadata={"help": f"Pooling of module outputs, one of {POOLINGS}."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.proj_beta <= 1.0:
            raise ValueError(f"proj_beta={self.proj_beta} must lie in [0, 1]")
        if self.direction_source not in DIRECTION_SOURCES:
            raise ValueError(f"direction_source={self.direction_source!r}: choose one of {DIRECTION_SOURCES}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {POOLINGS}")
        if self.direction_source == "reference" and self.precompute_ref_log_probs:
            raise ValueError(
                "direction_source=reference needs the reference forward at every step, but "
                "precompute_ref_log_probs=True skips it; turn precompute off or use direction_source=policy"
            )


@dataclass
class ProjGradConfig(GradientProjectionConfig):
    project_update: bool = field(
        default=False,
        metadata={
            "help": "Also split the parameter change the optimizer made (theta_old + D_par + beta * D_perp), so the "
            "update stays in span(u) under Adam's per-element scaling."
        },
    )


class PreferenceDirectionTrainer(DPOTrainer):
    """DPOTrainer that pools every adapted module's output for policy and reference around `compute_loss`."""

    def __init__(self, model, ref_model=None, args: GradientProjectionConfig | None = None, **kwargs):
        require_config(type(self).__name__, args, GradientProjectionConfig)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.projected = adapted_modules(self.model, args.proj_modules)
        reference = unwrap(self.ref_model) if self.ref_model is not None else None
        sites = {
            name: [module] + ([reference.get_submodule(name)] if reference is not None else [])
            for name, module in self.projected.items()
        }
        self.collector = StateCollector(sites, args.pooling, detach=True)

    def preference_vectors(self, states: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per module, r_c - r_r per example (B, d_out), from the reference call (or the policy's, detached)."""
        call = 1 if self.args.direction_source == "reference" else 0
        vectors = {}
        for name, pooled in states.items():
            if len(pooled) <= call:
                raise RuntimeError(f"module {name}: no reference forward was recorded in this compute_loss call")
            chosen, rejected = pooled[call].detach().chunk(2)
            vectors[name] = chosen - rejected
        return vectors


class ProjGradTrainer(PreferenceDirectionTrainer):
    """TRL's DPOTrainer with per-step gradient projection; see the module docstring."""

    _tag_names = ["trl", "dpo", "projgrad"]

    def __init__(self, model, ref_model=None, args: ProjGradConfig | None = None, **kwargs):
        require_config("ProjGradTrainer", args, ProjGradConfig)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.direction_sums: dict[str, torch.Tensor] = {}
        self.directions: dict[str, torch.Tensor] = {}  # the last step's unit directions, by module name
        self._before_step: dict[torch.Tensor, torch.Tensor] = {}
        self._parameters_of: dict[str, list[torch.nn.Parameter]] | None = None

    def train(self, *args, **kwargs):
        self._parameters_of = None  # looked up again after the Trainer prepares the model (FSDP2 replaces them)
        return super().train(*args, **kwargs)

    @property
    def parameters_of(self) -> dict[str, list[torch.nn.Parameter]]:
        """Per module, its tensors with an output axis, looked up at first use in a training run: FSDP2's
        fully_shard replaces every parameter object (by a DTensor one) when the Trainer prepares the model, so
        objects found at construction would no longer be the ones that get gradients."""
        if self._parameters_of is None:
            self._parameters_of = {name: output_axis_parameters(module) for name, module in self.projected.items()}
        return self._parameters_of

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.collector.capture(inputs["completion_mask"], inputs["attention_mask"]) as states:
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            for name, vectors in self.preference_vectors(states).items():
                self.direction_sums[name] = self.direction_sums.get(name, 0) + vectors.sum(0)
        return output

    @torch.no_grad()
    def edit_gradients(self):
        """Turns the accumulated direction sums into unit directions and edits the complete gradients in place:
        one all-reduce for every module's sum, one batched edit for every parameter (reprpo_trl.projection)."""
        names = sorted(self.direction_sums)
        sums = [self.direction_sums[name] for name in names]
        totals = self.accelerator.reduce(torch.cat(sums), "sum").split([len(total) for total in sums]) if sums else []
        self.directions = {name: unit(total) for name, total in zip(names, totals)}
        self.direction_sums = {}
        parameters, directions = self._parameters_and_directions()
        fractions = []

        def split(grads, edited_parameters):
            along = [directions[parameter] for parameter in edited_parameters]
            edited, fraction = project_output_axes(grads, along, self.args.proj_beta, self.args.renorm)
            fractions.append(fraction)
            return edited

        sharding.edit_gradients(parameters, split)
        if fractions:
            self.record("projgrad/parallel_fraction", torch.cat(fractions).mean())

    def _parameters_and_directions(self) -> tuple[list[torch.nn.Parameter], dict[torch.nn.Parameter, torch.Tensor]]:
        """Every projected parameter, in module-name order, and the direction of its module."""
        directions = {p: u for name, u in self.directions.items() for p in self.parameters_of[name]}
        return list(directions), directions

    def create_optimizer(self, model=None):
        first_call = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if first_call and self.args.project_update:
            optimizer.register_step_pre_hook(self._remember_parameters)
            optimizer.register_step_post_hook(self._project_update)
        return optimizer

    @torch.no_grad()
    def _remember_parameters(self, optimizer, args, kwargs):
        self._before_step = {p: sharding.full_parameter(p).clone() for ps in self.parameters_of.values() for p in ps}

    @torch.no_grad()
    def _project_update(self, optimizer, args, kwargs):
        """theta <- theta_old + D_par + beta * D_perp for D = theta - theta_old, along each module's direction,
        batched over every parameter. Under DeepSpeed these hooks sit on the inner optimizer, whose step updates
        the fp32 master weights; the engine copies them into the model afterwards, so the projected update is the
        one the model gets."""
        parameters, directions = self._parameters_and_directions()
        before = [self._before_step[p] for p in parameters]
        changes = [sharding.full_parameter(p) - old for p, old in zip(parameters, before)]
        along = [directions[p].to(change) for p, change in zip(parameters, changes)]
        projected, _ = project_output_axes(changes, along, self.args.proj_beta, self.args.renorm)
        for parameter, old, change in zip(parameters, before, projected):
            sharding.set_full_parameter(parameter, old + change)
        self._before_step = {}
