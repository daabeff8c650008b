"""Where activations are read: decoder layers chosen by a layer spec, pooled by forward hooks.

A layer spec is a comma-separated list of items, each one of
    12        a layer index
    -2        counted from the end (N - 2)
    0.5       a fraction of depth: int(0.5 * N)
    range(a, b[, step])   with a, b in any of the forms above (b exclusive, like Python's range)
e.g. "0.25, 0.5, -1" or "range(0.3, -2, 4)".
"""

import contextlib
import re

import torch
from torch import nn

POOLINGS = ("completion_mean", "all_mean", "last")

_RANGE = re.compile(r"range\(([^()]*)\)")


def _layer_index(token: str, n_layers: int, spec: str) -> int:
    token = token.strip()
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"layer spec {spec!r}: {token!r} is not an int, a fraction or range(a, b[, step])") from None
    if value.is_integer() and "." not in token:
        index = int(value)
        return index + n_layers if index < 0 else index
    if not 0.0 <= value < 1.0:
        raise ValueError(f"layer spec {spec!r}: fraction {token} must lie in [0, 1); use an int for a layer index")
    return int(value * n_layers)


def parse_layer_spec(spec: str | int | float | list, n_layers: int) -> list[int]:
    """Resolve a layer spec against a model with `n_layers` decoder layers into sorted unique indices."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    spec = str(spec)
    layers = []
    rest = _RANGE.sub(lambda m: "", spec)
    for match in _RANGE.finditer(spec):
        parts = match.group(1).split(",")
        if len(parts) not in (2, 3):
            raise ValueError(f"layer spec {spec!r}: {match.group(0)} needs 2 or 3 arguments")
        start, stop = (_layer_index(p, n_layers, spec) for p in parts[:2])
        step = int(parts[2]) if len(parts) == 3 else 1
        if step <= 0:
            raise ValueError(f"layer spec {spec!r}: range step must be a positive int, got {parts[2].strip()}")
        layers.extend(range(start, stop, step))
    layers.extend(_layer_index(t, n_layers, spec) for t in rest.split(",") if t.strip())
    if not layers:
        raise ValueError(f"layer spec {spec!r} selects no layer")
    bad = sorted({i for i in layers if not 0 <= i < n_layers})
    if bad:
        raise ValueError(f"layer spec {spec!r} selects layers {bad}, but the model has {n_layers} (0..{n_layers - 1})")
    return sorted(set(layers))


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft / DDP / DeepSpeed wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (the one whose length is the config's num_hidden_layers)."""
    model = unwrap(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {n_layers} decoder layers found")


def pool(hidden: torch.Tensor, completion_mask, attention_mask, pooling: str) -> torch.Tensor:
    """Masked pooling of (N, T', d) states over real tokens -> (N, d) in float32.

    T' may exceed the mask length T when prompt-learning adapters prepend virtual tokens;
    the last T positions are the real tokens. Padding never enters the statistic.
    """
    hidden = hidden[:, -completion_mask.shape[1] :].float()
    if pooling == "last":
        positions = torch.arange(completion_mask.shape[1], device=hidden.device)
        last = (positions * completion_mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = (completion_mask if pooling == "completion_mean" else attention_mask).to(hidden.dtype)
    return torch.einsum("ntd,nt->nd", hidden, mask) / mask.sum(1, keepdim=True).clamp(min=1.0)


def _output_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class StateCollector:
    """Pools the outputs of named modules with forward hooks while armed.

    `capture(completion_mask, attention_mask)` registers the hooks and yields a dict
    site -> list of pooled (N, d) states, one entry per forward call in call order.
    Within one TRL `compute_loss` the policy forward fires first, then the reference.
    Hooks are removed when the block exits, so gradient-checkpoint recomputation in the
    backward pass never records.
    """

    def __init__(self, sites: dict[str, list[nn.Module]], pooling: str = "completion_mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {POOLINGS}")
        self.sites = sites
        self.pooling = pooling

    @contextlib.contextmanager
    def capture(self, completion_mask, attention_mask):
        states = {name: [] for name in self.sites}

        def hook_for(name):
            def hook(module, args, output):
                states[name].append(pool(_output_tensor(output), completion_mask, attention_mask, self.pooling))

            return hook

        handles = [
            module.register_forward_hook(hook_for(name))
            for name, modules in self.sites.items()
            for module in modules
        ]
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()


def layer_sites(models: list[nn.Module], layers: list[int]) -> dict[str, list[nn.Module]]:
    """Site name -> the decoder layer at that index in each of `models` (policy, then an explicit reference)."""
    blocks = [decoder_layers(m) for m in models]
    return {f"layer_{i}": [b[i] for b in blocks] for i in layers}
