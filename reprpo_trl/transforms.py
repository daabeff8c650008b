"""Maps applied to every pooled state of a site before the hidden-state loss (docs/methods.md "Transforms").

The same map is applied to policy and reference states. Each takes (N, d) and returns (N, d).

    none       h
    ether      block-diagonal Householder: per block b, h_b - 2 (u_b.h_b) u_b / |u_b|^2          (orthogonal)
    etherplus  per block: h_b - (u_b.h_b) u_b / |u_b|^2 + (v_b.h_b) v_b / |v_b|^2; v = u at init -> identity
    hra        product of r Householder reflections; pairs start equal -> identity for even r. With
               gram_schmidt the u_i are orthonormalised first and the product is I - 2 Q Q^T    (orthogonal)
    ortho      a full orthogonal matrix via torch's orthogonal parametrization, identity at init (orthogonal)
    svd        fixed: h - V_k V_k^T h with V_k the top-k right singular vectors of the lm_head weight,
               i.e. the part of h the unembedding reads is removed
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from .errors import InputError
from .io import atomic_write_text

TRANSFORMS = ("none", "ether", "etherplus", "hra", "ortho", "svd")
ORTHO_MAPS = ("householder", "cayley", "matrix_exp")
ORTHOGONAL = ("ether", "hra", "ortho")  # maps that leave mse / innerdpo / prefvec unchanged
TRANSFORMS_FILE = "reprpo_transforms"  # .json (how to rebuild) + .safetensors (weights) beside the adapter


def _reflect(h, u, scale=2.0):
    """h - scale * (u.h) u / |u|^2 along the last axis (u broadcasts over leading axes)."""
    return h - scale * (h * u).sum(-1, keepdim=True) * u / (u * u).sum(-1, keepdim=True)


class Identity(nn.Module):
    def forward(self, h):
        return h


class Ether(nn.Module):
    """ETHER: one Householder reflection per block of d / n_blocks coordinates."""

    def __init__(self, dim: int, n_blocks: int = 4):
        super().__init__()
        if dim % n_blocks:
            raise InputError(f"ether: ether_blocks={n_blocks} must divide the site width {dim}")
        self.u = nn.Parameter(torch.randn(n_blocks, dim // n_blocks))

    def forward(self, h):
        blocks = h.unflatten(-1, self.u.shape)
        return _reflect(blocks, self.u).flatten(-2)


class EtherPlus(Ether):
    """ETHER+: per block I - u u^T/|u|^2 + v v^T/|v|^2 (not orthogonal); v starts equal to u, so identity at init."""

    def __init__(self, dim: int, n_blocks: int = 4):
        super().__init__(dim, n_blocks)
        self.v = nn.Parameter(self.u.detach().clone())

    def forward(self, h):
        blocks = h.unflatten(-1, self.u.shape)
        removed = blocks - _reflect(blocks, self.u, 1.0)  # (u.h) u / |u|^2
        added = blocks - _reflect(blocks, self.v, 1.0)
        return (blocks - removed + added).flatten(-2)


class HRA(nn.Module):
    """Householder reflection adaptation: H_1 H_2 ... H_r h, or I - 2 Q Q^T with Gram-Schmidt."""

    def __init__(self, dim: int, rank: int = 8, gram_schmidt: bool = False):
        super().__init__()
        if not 1 <= rank <= dim:
            raise InputError(f"hra: hra_rank={rank} must lie in [1, {dim}] (the site width)")
        u = torch.randn(rank, dim)
        if not gram_schmidt:
            u[1::2] = u[0 : rank - rank % 2 : 2]  # equal pairs cancel: identity at init
        self.u = nn.Parameter(u)
        self.gram_schmidt = gram_schmidt

    def forward(self, h):
        if self.gram_schmidt:
            q, _ = torch.linalg.qr(self.u.T)
            return h - 2 * (h @ q) @ q.T
        for u in reversed(self.u):
            h = _reflect(h, u)
        return h


class Ortho(nn.Module):
    """A full d x d orthogonal matrix, parametrized by torch (householder / cayley / matrix_exp); identity at init.
    Kept in float64 (orthogonal to ~1e-12; in float32 matrix_exp drifts to ~3e-5 after a few large steps), or in
    float32 under DeepSpeed and FSDP, which need one dtype for the parameters they flatten or shard together.
    Weight decay must stay off it: AdamW's decay of the householder parametrization's stored matrix collapses the
    map to zero (the trainers exclude transforms from weight decay)."""

    def __init__(self, dim: int, ortho_map: str = "householder", dtype: str = "float64"):
        super().__init__()
        if ortho_map not in ORTHO_MAPS:
            raise ValueError(f"ortho_map={ortho_map!r}: choose one of {ORTHO_MAPS}")
        linear = nn.Linear(dim, dim, bias=False, dtype=getattr(torch, dtype))
        with torch.no_grad():
            linear.weight.copy_(torch.eye(dim))
        self.linear = orthogonal(linear, orthogonal_map=ortho_map)

    def forward(self, h):
        return h @ self.linear.weight.to(h.dtype).T


class SVDProjection(nn.Module):
    """Removes the top-k right singular subspace of the unembedding: h - V_k V_k^T h. Not trained."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis.float())  # (d, k), orthonormal columns

    @classmethod
    def from_unembedding(cls, weight: torch.Tensor, rank: int | None = None, quantile: float = 0.75):
        """V_k from the (vocab, d) lm_head weight: the k = `rank` largest singular directions, or all whose
        singular value is at or above the `quantile` of the singular values (0.75 -> the top quarter)."""
        gram = weight.detach().double().T @ weight.detach().double()  # W^T W = V S^2 V^T
        eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
        singular = eigenvalues.clamp(min=0).sqrt().flip(0)
        vectors = vectors.flip(1)
        if rank is None:
            rank = int((singular >= torch.quantile(singular, quantile)).sum())
        if not 1 <= rank <= weight.shape[1]:
            raise InputError(f"svd: svd_rank={rank} must lie in [1, {weight.shape[1]}]")
        return cls(vectors[:, :rank])

    def forward(self, h):
        return h - (h @ self.basis) @ self.basis.T


def build_transform(name: str, dim: int, unembedding=None, **kwargs) -> nn.Module:
    """One transform for a site of width `dim`. kwargs: n_blocks (ether, etherplus), rank and gram_schmidt (hra),
    ortho_map and dtype (ortho), rank and quantile (svd, which also needs the lm_head `unembedding` weight)."""
    if name == "svd":
        if unembedding is None or unembedding.shape[1] != dim:
            raise ValueError(
                f"transform=svd removes the lm_head-readable subspace of the residual stream (width "
                f"{None if unembedding is None else unembedding.shape[1]}), but this site has width {dim}; "
                "use collection=hs or suppressed"
            )
        return SVDProjection.from_unembedding(unembedding, kwargs.get("rank"), kwargs.get("quantile", 0.75))
    builders = {
        "none": lambda: Identity(),
        "ether": lambda: Ether(dim, kwargs.get("n_blocks", 4)),
        "etherplus": lambda: EtherPlus(dim, kwargs.get("n_blocks", 4)),
        "hra": lambda: HRA(dim, kwargs.get("rank", 8), kwargs.get("gram_schmidt", False)),
        "ortho": lambda: Ortho(dim, kwargs.get("ortho_map", "householder"), kwargs.get("dtype", "float64")),
    }
    if name not in builders:
        raise ValueError(f"transform={name!r}: choose one of {sorted([*builders, 'svd'])}")
    return builders[name]()


class SiteTransforms(nn.Module):
    """One transform per site, built from spec {site: {"name": ..., "dim": ..., **kwargs}}; saved beside the adapter
    as `reprpo_transforms.json` (the spec) + `.safetensors` (the weights) so a trained run can be evaluated later."""

    def __init__(self, spec: dict[str, dict], unembedding=None):
        super().__init__()
        self.spec = {site: dict(entry) for site, entry in spec.items()}
        self.index = {site: i for i, site in enumerate(self.spec)}
        maps = []
        for entry in self.spec.values():
            kwargs = {k: v for k, v in entry.items() if k not in ("name", "dim")}
            if entry["name"] == "svd" and unembedding is None:  # rebuilt from a saved spec; load_state_dict fills it
                maps.append(SVDProjection(torch.zeros(entry["dim"], kwargs["rank"])))
                continue
            maps.append(build_transform(entry["name"], entry["dim"], unembedding, **kwargs))
            if entry["name"] == "svd":
                entry["rank"] = maps[-1].basis.shape[1]
        self.maps = nn.ModuleList(maps)

    def forward(self, site: str, h: torch.Tensor) -> torch.Tensor:
        return self.maps[self.index[site]](h)

    def save(self, directory: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the spec and `weights` (default: this module's state dict; pass complete tensors when sharded)."""
        os.makedirs(directory, exist_ok=True)
        state = self.state_dict() if weights is None else weights
        weights = os.path.join(directory, TRANSFORMS_FILE + ".safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
        atomic_write_text(os.path.join(directory, TRANSFORMS_FILE + ".json"), json.dumps(self.spec, indent=1))

    @classmethod
    def load(cls, directory: str) -> "SiteTransforms":
        path = os.path.join(directory, TRANSFORMS_FILE + ".json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: this directory holds no ReprPO transforms")
        transforms = cls(json.loads(open(path).read()))
        transforms.load_state_dict(load_file(os.path.join(directory, TRANSFORMS_FILE + ".safetensors")))
        return transforms
