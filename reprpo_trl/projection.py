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
from .sharding import full_shape
from .sites import decoder_layers, unwrap

EPS = 1e-12
NO_OUTPUT_AXIS = ("lora_A", "lora_embedding_A", "hira_A", "hira_embedding_A")  # factors in the input space


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """v / |v| along the last axis (0 stays 0)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=EPS)


def project_output_axis(grad: torch.Tensor, direction: torch.Tensor, beta: float, renorm: bool) -> torch.Tensor:
    """G' for a tensor whose axis 0 is the output axis (d_out, ...) and a unit direction (d_out,)."""
    return project_output_axes([grad], [direction], beta, renorm)[0][0]


def project_output_axes(grads: list, directions: list, beta: float, renorm: bool, max_elements: int = 2**26):
    """G' of every tensor in `grads` along its own unit direction, as `project_output_axis`, batched: tensors of
    one shape and dtype are stacked (at most `max_elements` at a time) and edited together. Also returns each
    tensor's parallel fraction |G_par|^2 / |G|^2 = |u^T G|^2 / |G|^2, as one (n,) tensor."""
    edited, fractions = [None] * len(grads), [None] * len(grads)
    groups: dict[tuple, list[int]] = {}
    for i, grad in enumerate(grads):
        groups.setdefault((grad.shape, grad.dtype, grad.device), []).append(i)
    for (shape, dtype, _), members in groups.items():
        per_chunk = max(1, max_elements // max(shape.numel(), 1))
        for start in range(0, len(members), per_chunk):
            index = members[start : start + per_chunk]
            flat = torch.stack([grads[i].reshape(shape[0], -1) for i in index])  # (K, d_out, m)
            u = torch.stack([directions[i] for i in index]).to(flat.device, dtype)  # (K, d_out)
            along = torch.einsum("kd,kdm->km", u, flat)  # u^T G
            out = flat - (1.0 - beta) * (flat - u[:, :, None] * along[:, None, :])
            norms = flat.flatten(1).norm(dim=1)
            if renorm:
                out = out * (norms / out.flatten(1).norm(dim=1).clamp(min=EPS))[:, None, None]
            fraction = along.norm(dim=1) ** 2 / norms.clamp(min=1e-30) ** 2
            for j, i in enumerate(index):
                edited[i], fractions[i] = out[j].reshape(shape), fraction[j]
    return edited, torch.stack(fractions) if fractions else torch.zeros(0)


def project_rows(grad: torch.Tensor, directions: torch.Tensor, beta: float, renorm: bool) -> torch.Tensor:
    """ProjBP's edit of grad_output (N, T, d): each row n, at every token, along its own unit direction (N, d);
    with renorm each row keeps its original norm over (T, d). Computed in float32 whatever the gradient's dtype:
    in bf16 the rounding left in a small parallel part would be scaled up by the renorm.
    g' = beta * g + (1 - beta) * (g . u) u, as two batched matmuls (a few passes over the gradient, not ten)."""
    g, u = grad.float(), directions.float()[:, None, :]  # (N, T, d), (N, 1, d)
    along = torch.bmm(g, u.transpose(1, 2))  # (N, T, 1): g . u at every token
    edited = torch.baddbmm(g, along, u, beta=beta, alpha=1.0 - beta)
    if renorm:
        norms, new_norms = (torch.linalg.vector_norm(x, dim=(1, 2)) for x in (g, edited))
        edited.mul_((norms / new_norms.clamp(min=EPS))[:, None, None])
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
    scaling vector. LoRA A and input-scaling vectors have no such axis and are left alone. Shapes are the full
    ones (ZeRO-3 leaves each process a flat partition)."""
    d_out = module.out_features
    return [
        p
        for name, p in module.named_parameters()
        if p.requires_grad and full_shape(p)[0] == d_out and not set(name.split(".")) & set(NO_OUTPUT_AXIS)
    ]
