"""Where activations are read (docs/methods.md "Sites"): pooled by forward hooks on decoder layers chosen by a layer spec.

Collections:
    hs          residual output h_l of each chosen decoder layer l
    side        input (or output) of the modules in each chosen layer whose name matches a regex
    suppressed  relu(h_l - h_{l+1}) of pooled states: what layer l+1 removed from the residual

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
from peft import PeftModel
from torch import nn

from .errors import InputError

POOLINGS = ("completion_mean", "all_mean", "last")
COLLECTIONS = ("hs", "side", "suppressed")
SIDE_DEFAULTS = {"input": "o_proj$,down_proj$", "output": "(q|k|v)_proj$,(gate|up)_proj$"}

_RANGE = re.compile(r"range\(([^()]*)\)")


def _layer_index(token: str, n_layers: int, spec: str) -> int:
    token = token.strip()
    try:
        value = float(token)
    except ValueError:
        raise InputError(f"layer spec {spec!r}: {token!r} is not an int, a fraction or range(a, b[, step])") from None
    if value.is_integer() and "." not in token:
        index = int(value)
        return index + n_layers if index < 0 else index
    if not 0.0 <= value < 1.0:
        raise InputError(f"layer spec {spec!r}: fraction {token} must lie in [0, 1); use an int for a layer index")
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
            raise InputError(f"layer spec {spec!r}: {match.group(0)} needs 2 or 3 arguments")
        start, stop = (_layer_index(p, n_layers, spec) for p in parts[:2])
        step = int(parts[2]) if len(parts) == 3 else 1
        if step <= 0:
            raise InputError(f"layer spec {spec!r}: range step must be a positive int, got {parts[2].strip()}")
        layers.extend(range(start, stop, step))
    layers.extend(_layer_index(t, n_layers, spec) for t in rest.split(",") if t.strip())
    if not layers:
        raise InputError(f"layer spec {spec!r} selects no layer")
    bad = sorted({i for i in layers if not 0 <= i < n_layers})
    if bad:
        raise InputError(f"layer spec {spec!r} selects layers {bad}, but the model has {n_layers} (0..{n_layers - 1})")
    return sorted(set(layers))


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft / DDP / DeepSpeed wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def as_base(model: nn.Module):
    """Context in which `model` computes as its base model: a peft model's adapter disabled, any other as is."""
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


@contextlib.contextmanager
def truncated(model: nn.Module, last_layer: int):
    """Inside, `model` runs its decoder layers 0..last_layer and no layer after them nor its LM head: the layer list
    holds only those layers and the output embedding is swapped for a map to an empty tensor (empty logits)."""
    base = unwrap(model)
    swaps = [(decoder_layers(base), nn.ModuleList(list(decoder_layers(base))[: last_layer + 1])), (base.get_output_embeddings(), _NoHead())]
    owners = {id(module): name for name, module in base.named_modules()}
    placed = []
    try:
        for module, replacement in swaps:
            parent, _, attribute = owners[id(module)].rpartition(".")
            placed.append((base.get_submodule(parent), attribute, module))
            setattr(placed[-1][0], attribute, replacement)
        yield
    finally:
        for parent, attribute, module in placed:
            setattr(parent, attribute, module)


class _NoHead(nn.Module):
    def forward(self, hidden):
        return hidden[..., :0]


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
    # (N, 1, T) @ (N, T, d) as one batched matmul: einsum took a multiply-and-sum path here, 10x slower on CPU
    return torch.bmm(mask[:, None, :], hidden).squeeze(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class StateCollector:
    """Pools the outputs (or, with read="input", the first input) of named modules with forward hooks while armed.

    `capture(completion_mask, attention_mask)` registers the hooks and yields a dict
    site -> list of pooled (N, d) states, one entry per forward call in call order.
    Within one TRL `compute_loss` the policy forward fires first, then the reference.
    Hooks are removed when the block exits, so gradient-checkpoint recomputation in the
    backward pass never records.
    """

    def __init__(self, sites: dict[str, list[nn.Module]], pooling="completion_mean", read="output", detach=False):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {POOLINGS}")
        if read not in SIDE_DEFAULTS:
            raise ValueError(f"read={read!r}: choose 'input' or 'output'")
        self.sites = sites
        self.pooling = pooling
        self.read = read
        self.detach = detach

    @contextlib.contextmanager
    def capture(self, completion_mask=None, attention_mask=None, reduce=None):
        """Every state is pooled when its hook fires, so nothing per token outlives the module that made it (under
        gradient checkpointing only the layer inputs stay, as without collection). States that need no gradient
        are pooled under no_grad; the others under pass-through saved-tensor hooks, which take the place of a
        checkpointed layer's own: its recomputation runs without these hooks, so the pooling must not register
        saved tensors with the checkpoint.
        `reduce` (a function of the (N, T', d) state) replaces the masked pooling, e.g. to gather positions."""
        reduce = reduce or (lambda tensor: pool(tensor, completion_mask, attention_mask, self.pooling))
        states = {name: [] for name in self.sites}

        def hook_for(name):
            def hook(module, args, kwargs, output):
                tensor = first_tensor((args or tuple(kwargs.values())) if self.read == "input" else output)
                keeps_graph = tensor.requires_grad and not self.detach
                with torch.autograd.graph.saved_tensors_hooks(_keep, _keep) if keeps_graph else torch.no_grad():
                    states[name].append(reduce(tensor))

            return hook

        handles = [
            module.register_forward_hook(hook_for(name), with_kwargs=True)
            for name, modules in self.sites.items()
            for module in modules
        ]
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()


def _keep(tensor):
    return tensor


def layer_sites(models: list[nn.Module], layers: list[int]) -> dict[str, list[nn.Module]]:
    """Site name -> the decoder layer at that index in each of `models` (policy, then an explicit reference)."""
    blocks = [decoder_layers(m) for m in models]
    return {f"layer_{i}": [b[i] for b in blocks] for i in layers}


def attention_sites(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Site "layer_i" -> the self-attention block of decoder layer i (its output: after o_proj, before the
    residual add), for every layer."""
    sites = {}
    for i, block in enumerate(decoder_layers(model)):
        found = [m for name, m in block.named_children() if "attn" in name.lower() or "attention" in type(m).__name__.lower()]
        if not found:
            raise ValueError(f"decoder layer {i} ({type(block).__name__}) has no self-attention child module")
        sites[f"layer_{i}"] = [found[0]]
    return sites


def side_patterns(spec: str) -> list[re.Pattern]:
    """The comma-separated regexes of side_modules, compiled; an invalid one is refused by name."""
    patterns = []
    for text in filter(None, (p.strip() for p in spec.split(","))):
        try:
            patterns.append(re.compile(text))
        except re.error as error:
            raise InputError(f"side_modules: {text!r} is not a valid regular expression ({error}); escape special "
                             "characters such as ( [ * with a backslash")  # fmt: skip
    return patterns


def side_sites(models: list[nn.Module], layers: list[int], patterns: str) -> dict[str, list[nn.Module]]:
    """Site "layer_i.<module name>" -> that module in each of `models`, for every module of each chosen layer
    whose name (relative to the layer, e.g. "self_attn.o_proj") matches one of the comma-separated regexes."""
    blocks = [decoder_layers(m) for m in models]
    patterns = side_patterns(patterns)
    sites = {}
    for i in layers:
        names = [name for name, _ in blocks[0][i].named_modules() if name]
        for regex in patterns:
            matched = [name for name in names if regex.search(name)]
            if not matched:
                raise InputError(
                    f"side module regex {regex.pattern!r} matches no module of decoder layer {i}; its modules are: "
                    + ", ".join(names)
                )
            for name in matched:
                sites[f"layer_{i}.{name}"] = [block[i].get_submodule(name) for block in blocks]
    return sites


def _width(module: nn.Module, read: str, site: str) -> int:
    attribute = "in_features" if read == "input" else "out_features"
    if not hasattr(module, attribute):
        raise InputError(f"side site {site}: {type(module).__name__} has no {attribute}; side sites must be linear layers")
    return getattr(module, attribute)


class Collection:
    """The sites a loss reads: raw hooked sites (pooled by a StateCollector) and the sites derived from them.
    `deepest_layer` is the last decoder layer any raw site lies in.

    `derive(raw)` maps pooled raw states {raw site: (N, d)} to {site: (N, d)}; for hs and side it is the
    identity, for suppressed site "suppressed_l" it is relu(h_l - h_{l+1}). `dims[site]` is each site's width.
    """

    def __init__(self, kind, models, layers, pooling="completion_mean", side_modules=None, side_io="input"):
        if kind not in COLLECTIONS:
            raise InputError(f"collection={kind!r}: choose one of {COLLECTIONS}")
        self.kind = kind
        hidden = unwrap(models[0]).config.get_text_config().hidden_size
        n_layers = len(decoder_layers(models[0]))
        if kind == "side":
            sites = side_sites(models, layers, side_modules or SIDE_DEFAULTS[side_io])
            self.collector = StateCollector(sites, pooling, read=side_io)
            self.raw_dims = {site: _width(modules[0], side_io, site) for site, modules in sites.items()}
            self.dims = dict(self.raw_dims)
            self.deepest_layer = max(layers)
            return
        self.pairs = {}
        if kind == "suppressed":
            if layers[-1] + 1 >= n_layers:
                raise InputError(
                    f"collection=suppressed reads layer l+1 after each chosen layer l, but layer {layers[-1]} is the "
                    f"last of {n_layers}; choose layers below {n_layers - 1}"
                )
            self.pairs = {f"suppressed_{l}": (f"layer_{l}", f"layer_{l + 1}") for l in layers}
            layers = sorted(set(layers) | {l + 1 for l in layers})
        self.deepest_layer = max(layers)  # the last decoder layer a site reads
        self.collector = StateCollector(layer_sites(models, layers), pooling)
        self.raw_dims = {site: hidden for site in self.collector.sites}
        self.dims = {site: hidden for site in (self.pairs or self.raw_dims)}

    def derive(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind != "suppressed":
            return raw
        return {site: torch.relu(raw[a] - raw[b]) for site, (a, b) in self.pairs.items()}
