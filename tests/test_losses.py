"""Each hidden-state loss: its value at initialisation, a float64 reference written independently in numpy,
and the sign of its gradient (the loss falls when the policy moves the intended way)."""

import math

import numpy as np
import pytest
import torch

from reprpo_trl.losses import EPS, HIDDEN_LOSSES, innerdpo_loss, mse_loss, prefvec_loss, rank_loss, topk_loss

B, D = 5, 16


def random_states(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=dtype) for _ in range(4)]


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


# ---- float64 references, written from docs/methods.md without torch ----
def ref_geometry(hc, hr, rc, rr):
    p, q = rc - rr, hc - hr
    pn = np.linalg.norm(p, axis=-1)
    u = p / (pn + EPS)[:, None]
    along = (q * u).sum(-1)
    proj = along / (pn + EPS)
    orth = np.linalg.norm(q - along[:, None] * u, axis=-1) / (pn + EPS)
    cos = along / np.maximum(np.linalg.norm(q, axis=-1) * np.linalg.norm(u, axis=-1), EPS)
    return proj, orth, cos


def ref_mse(hc, hr, rc, rr, lam):
    g = ((rr - rc) ** 2).sum(-1) + EPS
    return ((hr - rc) ** 2).sum(-1) / g + lam * ((hc - rc) ** 2).sum(-1) / g


def ref_innerdpo(hc, hr, rc, rr, beta, bidir):
    proj = ref_geometry(hc, hr, rc, rr)[0]
    proj = np.abs(proj) if bidir else proj
    return -log_sigmoid(beta * (proj - 1))


def ref_prefvec(hc, hr, rc, rr, beta, g_orth, g_angle):
    proj, orth, cos = ref_geometry(hc, hr, rc, rr)
    return -log_sigmoid(beta * (proj - 1)) + g_orth * orth + g_angle * (1 - np.abs(cos))


def ref_rank(hc, hr, rc, rr, beta):
    def logsoftmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    delta = (logsoftmax(hc) - logsoftmax(rc)) - (logsoftmax(hr) - logsoftmax(rr))
    return (-log_sigmoid(beta * delta)).mean(-1)


def ref_topk(hc, hr, rc, rr, k, T):
    p, q = rc - rr, hc - hr
    out = []
    for i in range(len(p)):
        idx = np.argsort(-np.abs(p[i]))[:k]
        ratio = (q[i, idx] * p[i, idx]).sum() / ((p[i, idx] ** 2).sum() + EPS)
        out.append(max(0, 1 - ratio) + max(0, ratio - T) + (ratio - T) ** 2 / T**2)
    return np.array(out)


CASES = [
    ("mse", mse_loss, {"retain_weight": 0.7}, lambda *s: ref_mse(*s, 0.7)),
    ("innerdpo", innerdpo_loss, {"beta_h": 2.0}, lambda *s: ref_innerdpo(*s, 2.0, False)),
    ("innerdpo_bidir", innerdpo_loss, {"beta_h": 2.0, "bidirectional": True}, lambda *s: ref_innerdpo(*s, 2.0, True)),
    (
        "prefvec",
        prefvec_loss,
        {"beta_h": 1.5, "orth_weight": 0.3, "angle_weight": 0.2},
        lambda *s: ref_prefvec(*s, 1.5, 0.3, 0.2),
    ),
    ("rank", rank_loss, {"beta_h": 3.0}, lambda *s: ref_rank(*s, 3.0)),
    ("topk", topk_loss, {"k": 4, "T": 2.0}, lambda *s: ref_topk(*s, 4, 2.0)),
]


@pytest.mark.parametrize("name,fn,kwargs,reference", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(name, fn, kwargs, reference):
    states = random_states(seed=1)
    loss, _ = fn(*states, **kwargs)
    expected = reference(*[s.numpy() for s in states])
    assert loss.shape == (B,)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-9, atol=1e-12)


INIT_VALUES = {
    "mse": 1.0,
    "innerdpo": math.log(2),
    "prefvec": math.log(2),
    "rank": math.log(2),
    "topk": (1 - 2.0) ** 2 / 2.0**2,
}


@pytest.mark.parametrize("name", sorted(HIDDEN_LOSSES))
def test_value_at_initialisation(name):
    """pi = ref: every loss has the value docs/methods.md gives."""
    _, _, rc, rr = random_states(seed=2)
    loss, _ = HIDDEN_LOSSES[name](rc.clone(), rr.clone(), rc, rr)
    np.testing.assert_allclose(loss.numpy(), INIT_VALUES[name], atol=1e-5)


def test_geometry_at_initialisation():
    _, _, rc, rr = random_states(seed=3)
    _, diag = prefvec_loss(rc.clone(), rr.clone(), rc, rr)
    np.testing.assert_allclose(diag["proj"].numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(diag["orth"].numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(diag["cos"].numpy(), 1.0, atol=1e-6)


def _loss_after_step(name, move, **kwargs):
    """Loss at init and after moving the policy states by `move(hc, hr, rc, rr) -> (hc', hr')`."""
    _, _, rc, rr = random_states(seed=4)
    fn = HIDDEN_LOSSES[name]
    before = fn(rc.clone(), rr.clone(), rc, rr, **kwargs)[0].mean()
    hc, hr = move(rc.clone(), rr.clone(), rc, rr)
    after = fn(hc, hr, rc, rr, **kwargs)[0].mean()
    return before.item(), after.item()


def separate(hc, hr, rc, rr, step=0.2):
    """Move chosen and rejected further apart along the reference preference direction."""
    p = rc - rr
    return hc + step * p, hr - step * p


def test_mse_falls_when_rejected_moves_to_reference_chosen():
    before, after = _loss_after_step("mse", lambda hc, hr, rc, rr: (hc, hr + 0.5 * (rc - hr)))
    assert after < before
    _, after_wrong = _loss_after_step("mse", lambda hc, hr, rc, rr: (hc, hr - 0.5 * (rc - hr)))
    assert after_wrong > before


@pytest.mark.parametrize("name", ["innerdpo", "prefvec", "topk"])
def test_falls_when_separation_grows_along_reference(name):
    before, after = _loss_after_step(name, separate)
    assert after < before
    _, after_wrong = _loss_after_step(name, lambda *s: separate(*s, step=-0.2))
    assert after_wrong > before


def test_topk_rises_beyond_T():
    """Separation far beyond T times the reference's is penalised again."""
    _, far = _loss_after_step("topk", lambda *s: separate(*s, step=3.0), T=2.0)
    _, near_t = _loss_after_step("topk", lambda *s: separate(*s, step=0.5), T=2.0)
    assert far > near_t


def test_prefvec_penalises_orthogonal_change():
    def sideways(hc, hr, rc, rr):
        p = rc - rr
        noise = torch.randn_like(p)
        ortho = noise - (noise * p).sum(-1, keepdim=True) / (p * p).sum(-1, keepdim=True) * p
        return hc + 0.5 * ortho, hr

    before, after = _loss_after_step("prefvec", sideways)
    assert after > before
    # innerdpo alone does not see a purely orthogonal move
    b2, a2 = _loss_after_step("innerdpo", sideways)
    assert a2 == pytest.approx(b2, abs=1e-6)


def test_bidirectional_counts_reversed_separation():
    flip = lambda hc, hr, rc, rr: (hr.clone() - 0.5 * (rc - rr), hc.clone())  # noqa: E731  q = -(2p) roughly
    one_way = _loss_after_step("innerdpo", flip)
    both_ways = _loss_after_step("innerdpo", flip, bidirectional=True)
    assert one_way[1] > one_way[0]
    assert both_ways[1] < both_ways[0]


def test_rank_sign_on_one_unit():
    """DPO on units: raising unit j in the chosen state and lowering it in the rejected (j of low softmax mass,
    so the log-softmax normaliser barely moves) lowers the loss; the reverse raises it."""

    def unit_move(delta):
        def move(hc, hr, rc, rr):
            j = (rc.softmax(-1) + rr.softmax(-1)).argmin(-1)
            e = torch.nn.functional.one_hot(j, D).to(hc.dtype)
            return hc + delta * e, hr - delta * e

        return move

    before, after = _loss_after_step("rank", unit_move(0.1))
    assert after < before
    _, after_wrong = _loss_after_step("rank", unit_move(-0.1))
    assert after_wrong > before


@pytest.mark.parametrize("name", sorted(HIDDEN_LOSSES))
def test_gradient_flows_to_policy_only(name):
    hc, hr, rc, rr = random_states(seed=5)
    hc.requires_grad_(True)
    hr.requires_grad_(True)
    loss, _ = HIDDEN_LOSSES[name](hc, hr, rc, rr)
    loss.mean().backward()
    assert hc.grad is not None and hr.grad is not None
    assert torch.isfinite(hc.grad).all() and hc.grad.abs().sum() > 0
