"""Transforms: orthogonality, identity at init, the invariance of inner-product losses, the svd removal, save/load."""

import pytest
import torch

from reprpo_trl import ReprPOConfig
from reprpo_trl.losses import HIDDEN_LOSSES
from reprpo_trl.transforms import SVDProjection, SiteTransforms, build_transform

DIM = 32
ORTHOGONAL_CASES = [
    ("ether", {}),
    ("hra", {}),
    ("hra", {"gram_schmidt": True}),
    ("ortho", {"ortho_map": "householder"}),
    ("ortho", {"ortho_map": "cayley"}),
    ("ortho", {"ortho_map": "matrix_exp"}),
]
IDENTITY_AT_INIT = [
    ("none", {}),
    ("etherplus", {}),
    ("hra", {"rank": 6}),
    ("ortho", {"ortho_map": "householder"}),
    ("ortho", {"ortho_map": "cayley"}),
    ("ortho", {"ortho_map": "matrix_exp"}),
]


def perturbed(name, **kwargs):
    """A transform moved away from its initialisation by a few gradient steps, as training would move it."""
    torch.manual_seed(0)
    transform = build_transform(name, DIM, **kwargs)
    optimizer = torch.optim.SGD(transform.parameters(), lr=1.0)
    x, target = torch.randn(8, DIM), torch.randn(8, DIM)
    for _ in range(3):
        optimizer.zero_grad()
        ((transform(x) - target) ** 2).sum().backward()
        optimizer.step()
    return transform


def matrix(transform):
    return transform(torch.eye(DIM)).T  # column j = T(e_j)


@pytest.mark.parametrize("name,kwargs", ORTHOGONAL_CASES, ids=lambda c: str(c))
def test_orthogonal_maps_are_orthogonal(name, kwargs):
    m = matrix(perturbed(name, **kwargs))
    assert torch.allclose(m @ m.T, torch.eye(DIM), atol=1e-5)
    assert not torch.allclose(m, torch.eye(DIM), atol=1e-3), "perturbation left the map at identity"


@pytest.mark.parametrize("name,kwargs", IDENTITY_AT_INIT, ids=lambda c: str(c))
def test_identity_at_init(name, kwargs):
    torch.manual_seed(0)
    h = torch.randn(5, DIM)
    assert torch.allclose(build_transform(name, DIM, **kwargs)(h), h, atol=1e-5)


def test_ether_is_a_blockwise_reflection():
    torch.manual_seed(0)
    ether = build_transform("ether", DIM, n_blocks=4)
    m = matrix(ether).double()
    block = 8
    u = ether.u[1].double()
    expected = torch.eye(block, dtype=torch.float64) - 2 * torch.outer(u, u) / u.dot(u)
    assert torch.allclose(m[block : 2 * block, block : 2 * block], expected, atol=1e-6)
    assert torch.allclose(m[:block, block:], torch.zeros(block, DIM - block, dtype=torch.float64), atol=1e-7)


def test_etherplus_is_not_orthogonal_once_trained():
    m = matrix(perturbed("etherplus"))
    assert not torch.allclose(m @ m.T, torch.eye(DIM), atol=1e-2)


def test_hra_matches_product_of_reflections():
    transform = perturbed("hra", rank=3)
    expected = torch.eye(DIM, dtype=torch.float64)
    for u in transform.u.double():
        expected = expected @ (torch.eye(DIM, dtype=torch.float64) - 2 * torch.outer(u, u) / u.dot(u))
    assert torch.allclose(matrix(transform).double(), expected, atol=1e-5)


def states(seed=0, n=6):
    torch.manual_seed(seed)
    rc, rr = torch.randn(n, DIM), torch.randn(n, DIM)
    return rc + 0.3 * torch.randn(n, DIM), rr + 0.3 * torch.randn(n, DIM), rc, rr


@pytest.mark.parametrize("name,kwargs", ORTHOGONAL_CASES, ids=lambda c: str(c))
def test_inner_product_losses_are_invariant_under_orthogonal_maps(name, kwargs):
    transform = perturbed(name, **kwargs)
    x = states()
    moved = [transform(s) for s in x]
    for loss in ("mse", "innerdpo", "prefvec"):
        assert torch.allclose(HIDDEN_LOSSES[loss](*moved)[0], HIDDEN_LOSSES[loss](*x)[0], atol=1e-4), loss
    assert not torch.allclose(HIDDEN_LOSSES["rank"](*moved)[0], HIDDEN_LOSSES["rank"](*x)[0], atol=1e-4)


@pytest.mark.parametrize("transform", ["ether", "hra", "ortho"])
@pytest.mark.parametrize("loss", ["mse", "innerdpo", "prefvec"])
def test_warns_when_an_orthogonal_map_meets_an_invariant_loss(transform, loss, tmp_path):
    with pytest.warns(UserWarning, match="orthogonal"):
        ReprPOConfig(output_dir=str(tmp_path), use_cpu=True, transform=transform, hidden_loss=loss)


def unembedding(vocab=50):
    torch.manual_seed(1)
    scales = torch.logspace(1, -2, DIM)
    return torch.randn(vocab, DIM) * scales  # a decaying spectrum


def test_svd_removes_the_lm_head_readable_subspace():
    weight = unembedding()
    projection = SVDProjection.from_unembedding(weight, rank=5)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    h = torch.randn(7, DIM)
    kept = projection(h).double()
    assert torch.allclose(kept @ vh[:5].T, torch.zeros(7, 5, dtype=torch.float64), atol=1e-5)
    logits = kept @ weight.double().T  # unembedding of the transformed state
    assert torch.allclose(logits @ u[:, :5], torch.zeros(7, 5, dtype=torch.float64), atol=1e-4)
    rest = h.double() @ vh[5:].T
    assert torch.allclose(kept @ vh[5:].T, rest, atol=1e-5), "the internal remainder must be kept"


def test_svd_quantile_picks_the_top_singular_directions():
    weight = unembedding()
    assert SVDProjection.from_unembedding(weight, quantile=0.75).basis.shape == (DIM, 8)
    assert SVDProjection.from_unembedding(weight, quantile=0.5).basis.shape == (DIM, 16)


def test_svd_refuses_a_site_of_another_width():
    with pytest.raises(ValueError, match="width 64"):
        build_transform("svd", 64, unembedding=unembedding())


@pytest.mark.parametrize("name", ["ether", "etherplus", "hra", "ortho", "svd"])
def test_save_and_load_give_the_same_map(name, tmp_path):
    spec = {"layer_1": {"name": name, "dim": DIM}, "layer_2.mlp.down_proj": {"name": name, "dim": DIM}}
    transforms = SiteTransforms(spec, unembedding())
    with torch.no_grad():
        for parameter in transforms.parameters():
            parameter.add_(torch.randn_like(parameter))
    transforms.save(str(tmp_path))
    loaded = SiteTransforms.load(str(tmp_path))
    h = torch.randn(3, DIM)
    for site in spec:
        assert torch.allclose(loaded(site, h), transforms(site, h), atol=1e-6)


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="reprpo_transforms.json"):
        SiteTransforms.load(str(tmp_path))
