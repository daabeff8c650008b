"""Whole tensors under every backend: the package edits complete gradients and parameters and saves complete
weights, wherever the engine keeps them.

    plain, DDP   param.grad / param (DDP has all-reduced the gradient at the accumulation boundary)
    FSDP2        DTensors sharded on dim 0: gathered with full_tensor(), written back as this rank's shard
    DeepSpeed    deepspeed.utils' safe_* API (ZeRO-1/2/3): the fp32 gradient or master weight gathered from its
                 partitions and written back into them; valid between the last backward of a step and the
                 optimizer step (gradients) or around the inner optimizer's step (parameters)
"""

import contextlib

import torch
from torch import nn


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def _is_deepspeed(parameter) -> bool:
    return hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")


def _write_back(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` into `target`, which is a plain tensor or a DTensor holding this rank's shard of it."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(full)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: an FSDP2 shard, a ZeRO-3 partition, or all of it."""
    if _is_dtensor(tensor):
        return tensor.to_local()
    return tensor.ds_tensor if hasattr(tensor, "ds_tensor") else tensor


def edit_gradients(parameters: list[nn.Parameter], edit) -> None:
    """grads <- edit(full grads, parameters) -> edited full grads, for the parameters that have a gradient, under
    any backend: one call over all of them where gradients are whole on this process (plain, DDP; FSDP2 gathers
    them), one call per parameter under DeepSpeed, whose API updates its partitions one parameter at a time."""
    if any(_is_deepspeed(p) for p in parameters):
        from deepspeed.utils import safe_update_full_grad_vectorized

        def one(grad, p):
            return edit([grad.reshape(full_shape(p))], [p])[0].reshape(grad.shape)

        safe_update_full_grad_vectorized(parameters, one)
        return
    having = [p for p in parameters if p.grad is not None]
    edited = edit([full(p.grad) for p in having], having) if having else []
    plain = [(p.grad, e) for p, e in zip(having, edited) if not _is_dtensor(p.grad)]
    if plain:
        torch._foreach_copy_([grad for grad, _ in plain], [e for _, e in plain])
    for p, e in zip(having, edited):
        if _is_dtensor(p.grad):
            _write_back(p.grad, e)


def full_shape(parameter: nn.Parameter) -> torch.Size:
    return getattr(parameter, "ds_shape", None) or parameter.shape


def full_parameter(parameter: nn.Parameter) -> torch.Tensor:
    """The complete value of `parameter` (DeepSpeed: the fp32 master weight)."""
    if _is_deepspeed(parameter):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(parameter).reshape(full_shape(parameter))
    return full(parameter.detach())


def set_full_parameter(parameter: nn.Parameter, value: torch.Tensor) -> None:
    """Write a complete value into `parameter` (DeepSpeed: into the fp32 master weight, which the engine copies to
    the model's weights at the end of its step)."""
    if _is_deepspeed(parameter):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(parameter, value)
    else:
        with torch.no_grad():
            _write_back(parameter, value)


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Inside, `module`'s parameters are complete on every rank (ZeRO-3 gathers them; other backends need nothing)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with complete tensors on the CPU, under any backend (call it on every rank)."""
    with gathered(module):
        return {name: full(tensor).detach().cpu().clone() for name, tensor in module.state_dict().items()}
