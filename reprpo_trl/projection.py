"""Gradient projection onto a preference direction (docs/methods.md "Gradient methods"): the math and where it applies.

For a unit direction u in a module's output space and a tensor G whose output axis has that size,

    G_par = u (u^T G)        G_perp = G - G_par        G' = G_par + beta * G_perp

and with renorm G' is rescaled to |G|. Written as G - (1 - beta) G_perp so that beta = 1 returns G bit for bit.
"""

import re

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .errors import InputError
from .sites import decoder_layers, unwrap

EPS = 1e-12
NO_OUTPUT_AXIS = ("lora_A", "lora_embedding_A", "hira_A", "hira_embedding_A")  # factors in the input space


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """v / |v| along the last axis (0 stays 0)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=EPS)


def project_output_axis(grad: torch.Tensor, direction: torch.Tensor, beta: float, renorm: bool) -> torch.Tensor:
    """G' for a tensor whose axis 0 is the output axis (d_out, ...) and a unit direction (d_out,)."""
    flat = grad.reshape(grad.shape[0], -1)
    u = direction.to(flat.dtype)
    edited = flat - (1.0 - beta) * (flat - torch.outer(u, u @ flat))
    if renorm:
        edited = edited * (flat.norm() / edited.norm().clamp(min=EPS))
    return edited.reshape(grad.shape)


def project_rows(grad: torch.Tensor, directions: torch.Tensor, beta: float, renorm: bool) -> torch.Tensor:
    """ProjBP's edit of grad_output (N, T, d): each row n, at every token, along its own unit direction (N, d);
    with renorm each row keeps its original norm over (T, d). Computed in float32 whatever the gradient's dtype:
    in bf16 the rounding left in a small parallel part would be scaled up by the renorm."""
    g, u = grad.float(), directions.float()[:, None, :]
    edited = g - (1.0 - beta) * (g - (g * u).sum(-1, keepdim=True) * u)
    if renorm:
        norms, new_norms = g.flatten(1).norm(dim=1), edited.flatten(1).norm(dim=1)
        edited = edited * (norms / new_norms.clamp(min=EPS))[:, None, None]
    return edited.to(grad.dtype)


def adapted_modules(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """Modules whose weights train: peft tuner layers (LoRA, IA3, HiRA, ...) with trainable parameters, or, for
    full fine-tuning, every linear layer of the decoder blocks. Names are relative to the transformers model, so
    an explicit reference copy resolves the same names; `pattern` (a regex) narrows the set."""
    base = unwrap(model)
    if any(isinstance(m, BaseTunerLayer) for m in base.modules()):
        candidates = {
            name: m
            for name, m in base.named_modules()
            if isinstance(m, BaseTunerLayer) and any(p.requires_grad for p in m.parameters())
        }
    else:
        blocks = {id(m) for m in decoder_layers(base).modules()}
        candidates = {
            name: m
            for name, m in base.named_modules()
            if isinstance(m, nn.Linear) and id(m) in blocks and m.weight.requires_grad
        }
    if pattern:
        candidates = {name: m for name, m in candidates.items() if re.search(pattern, name)}
    if not candidates:
        raise InputError(
            f"no adapted module{'' if not pattern else f' matches proj_modules={pattern!r}'}: gradient projection "
            "needs modules with trainable weights (LoRA, IA3, HiRA or full fine-tuning); prompt and prefix tuning "
            "have none"
        )
    return candidates


def output_axis_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable tensors of `module` whose axis 0 is its output axis: LoRA B, a full weight or bias, an IA3 output
    scaling vector. LoRA A and input-scaling vectors have no such axis and are left alone."""
    d_out = module.out_features
    return [
        p
        for name, p in module.named_parameters()
        if p.requires_grad and p.shape[0] == d_out and not set(name.split(".")) & set(NO_OUTPUT_AXIS)
    ]
