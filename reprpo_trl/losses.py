"""Hidden-state losses L_h: pure functions of pooled states (docs/methods.md "Hidden-state losses").

Every loss takes the pooled states of one site, each of shape (B, d):
    hc, hr  policy chosen / rejected (with gradient)
    rc, rr  reference chosen / rejected (no gradient)
and returns (per_example_loss of shape (B,), diagnostics: dict[name -> (B,) tensor]).

Shared notation: p = rc - rr (reference preference vector), u = p / (|p| + eps),
q = hc - hr (policy preference vector).
"""

import torch
import torch.nn.functional as F

EPS = 1e-6


def preference_geometry(hc, hr, rc, rr):
    """Where the policy's preference vector q sits relative to the reference's p.

    proj  = (q.u) / (|p| + eps)          separation along p, relative to the reference (1 at init)
    orth  = |q - (q.u) u| / (|p| + eps)  separation off the reference axis (0 at init)
    cos   = cos(q, u)                    (1 at init)
    """
    p = rc - rr
    q = hc - hr
    p_norm = p.norm(dim=-1)
    u = p / (p_norm + EPS).unsqueeze(-1)
    q_along = (q * u).sum(-1)
    proj = q_along / (p_norm + EPS)
    orth = (q - q_along.unsqueeze(-1) * u).norm(dim=-1) / (p_norm + EPS)
    cos = F.cosine_similarity(q, u, dim=-1, eps=EPS)
    return {"proj": proj, "orth": orth, "cos": cos}


def mse_loss(hc, hr, rc, rr, retain_weight=1.0):
    """Reroute/retain relative to the reference gap g = |rr - rc|^2 + eps.

    L = |hr - rc|^2 / g + lambda_retain * |hc - rc|^2 / g      (1 at init)
    """
    gap = (rr - rc).pow(2).sum(-1) + EPS
    reroute = (hr - rc).pow(2).sum(-1) / gap
    retain = (hc - rc).pow(2).sum(-1) / gap
    return reroute + retain_weight * retain, {"reroute": reroute, "retain": retain}


def innerdpo_loss(hc, hr, rc, rr, beta_h=1.0, bidirectional=False):
    """L = -log sigmoid(beta_h * (proj - 1)), proj as in `preference_geometry` (log 2 at init).

    With `bidirectional`, |proj| is used: separation in either direction along p counts.
    """
    geometry = preference_geometry(hc, hr, rc, rr)
    proj = geometry["proj"].abs() if bidirectional else geometry["proj"]
    return -F.logsigmoid(beta_h * (proj - 1.0)), geometry


def prefvec_loss(hc, hr, rc, rr, beta_h=1.0, bidirectional=False, orth_weight=1.0, angle_weight=0.0):
    """innerdpo + gamma_orth * orth + gamma_angle * (1 - |cos(q, u)|)   (log 2 at init)."""
    inner, geometry = innerdpo_loss(hc, hr, rc, rr, beta_h=beta_h, bidirectional=bidirectional)
    angle = 1.0 - geometry["cos"].abs()
    loss = inner + orth_weight * geometry["orth"] + angle_weight * angle
    return loss, {**geometry, "innerdpo": inner, "angle": angle}


def rank_loss(hc, hr, rc, rr, beta_h=1.0):
    """DPO on hidden units, l = log_softmax over d:

    delta = [l(hc) - l(rc)] - [l(hr) - l(rr)];  L = mean_d(-log sigmoid(beta_h * delta))   (log 2 at init)
    """
    logp = lambda h: F.log_softmax(h, dim=-1)  # noqa: E731
    delta = (logp(hc) - logp(rc)) - (logp(hr) - logp(rr))
    return -F.logsigmoid(beta_h * delta).mean(-1), {"rank_margin": delta.mean(-1)}


def topk_loss(hc, hr, rc, rr, k=None, T=2.0):
    """Separation ratio on the k coordinates of largest |p| (k default min(100, d // 4)):

    ratio = (q_k . p_k) / (|p_k|^2 + eps)   (1 at init)
    L = relu(1 - ratio) + relu(ratio - T) + (ratio - T)^2 / T^2   ((1 - T)^2 / T^2 at init)
    """
    p = rc - rr
    q = hc - hr
    k = k or min(100, max(1, p.shape[-1] // 4))
    idx = p.abs().topk(k, dim=-1).indices
    p_k, q_k = p.gather(-1, idx), q.gather(-1, idx)
    ratio = (q_k * p_k).sum(-1) / (p_k.pow(2).sum(-1) + EPS)
    loss = F.relu(1.0 - ratio) + F.relu(ratio - T) + (ratio - T).pow(2) / T**2
    return loss, {"topk_ratio": ratio}


HIDDEN_LOSSES = {
    "mse": mse_loss,
    "innerdpo": innerdpo_loss,
    "prefvec": prefvec_loss,
    "rank": rank_loss,
    "topk": topk_loss,
}
