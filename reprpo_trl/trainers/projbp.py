"""ProjBP: DPO whose backward pass is projected onto each example's reference preference direction.

During the policy forward each adapted module's output tensor gets a gradient hook (it receives grad_output;
the module output itself is not kept). In backward it edits the gradient row by row: for row n of pair i,
at every token, g' = g_par + beta * g_perp along u_i = unit(r_c,i - r_r,i) of that module's pooled reference
output, rescaled to the row's original norm (`renorm`, default on). The edit flows on into earlier layers.
Because it lives inside autograd, it works wherever backward does: single process, DDP, DeepSpeed, FSDP.
"""

from dataclasses import dataclass, field

import torch

from ..projection import project_rows, unit
from ..sites import first_tensor
from .backends import require_config
from .projgrad import GradientProjectionConfig, PreferenceDirectionTrainer


@dataclass
class ProjBPConfig(GradientProjectionConfig):
    renorm: bool = field(default=True, metadata={"help": "Rescale each edited row of grad_output to its norm."})


class ProjBPTrainer(PreferenceDirectionTrainer):
    """TRL's DPOTrainer with per-example projection of module output gradients; see the module docstring."""

    _tag_names = ["trl", "dpo", "projbp"]
    reads_hooked_states = True  # edits the gradient of each adapted module's output

    def __init__(self, model, ref_model=None, args: ProjBPConfig | None = None, **kwargs):
        require_config("ProjBPTrainer", args, ProjBPConfig)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The gradient hook goes on each adapted module's output during the policy forward; it reads the pair
        directions, which the reference forward gives afterwards, when backward reaches it. Nothing per token is
        kept here: autograd holds what it would hold for DPO (with gradient checkpointing, only layer inputs)."""
        directions: dict[str, torch.Tensor] = {}
        hooked = set()

        def edit_policy_output(name):
            def hook(module, args, output):
                tensor = first_tensor(output)
                if name not in hooked and tensor.requires_grad:
                    hooked.add(name)
                    tensor.register_hook(lambda grad: self._edit(grad, directions[name]))

            return hook

        handles = [m.register_forward_hook(edit_policy_output(n)) for n, m in self.projected.items()]
        try:
            with self.collector.capture(inputs["completion_mask"], inputs["attention_mask"]) as states:
                output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            for handle in handles:
                handle.remove()
        if torch.is_grad_enabled() and self.model.training:
            if not hooked:
                raise RuntimeError(
                    "ProjBP found no adapted-module output that requires grad; with gradient checkpointing set "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}"
                )
            for name, vectors in self.preference_vectors(states).items():
                directions[name] = unit(vectors).repeat(2, 1)  # rows [B chosen; B rejected] share pair i's direction
        return output

    def _edit(self, grad, directions):
        return project_rows(grad, directions, self.args.proj_beta, self.args.renorm)
