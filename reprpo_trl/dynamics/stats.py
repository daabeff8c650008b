"""Weight statistics of one checkpoint (docs/methods.md "Training dynamics"), per trained matrix M (m x n, k = min(m, n)),
then averaged over matrices:

    l1 = sum |M_ij|             l2 = ||M||_F               trace = sum_{i<k} M_ii        spectral = sigma_max
    code_sparsity = l1 / l2     computational_sparsity = trace / spectral   (both 0 for a zero matrix)
    sv_mean, sv_var             mean and variance of sigma_1..sigma_k, with sigma < 1e-5 set to 0
    w_mean, w_median, w_var     of the entries (median: the lower one, M's sorted entries at (mn - 1) // 2)
    b_mean, b_median, b_var     the same over each trained bias vector (only when there are biases)

Variances are population variances. Low-rank M = U V (r columns) is never decomposed densely: its singular values
are those of the r x r product R_U R_V^T of the QR factors (U = Q_U R_U, V^T = Q_V R_V), padded with zeros to k,
and l2 = sqrt(sum sigma^2); the entries are still formed once for l1, the median and the entry moments. A
diagonal M = diag(v) (n x n) needs no matrix at all.
"""

import math

import torch

from .matrices import Matrix, trained_matrices

SV_FLOOR = 1e-5
MATRIX_STATS = ("l1", "l2", "trace", "spectral", "code_sparsity", "computational_sparsity", "sv_mean", "sv_var",
                "w_mean", "w_median", "w_var")  # fmt: skip
BIAS_STATS = ("b_mean", "b_median", "b_var")


def lower_median(values: torch.Tensor) -> float:
    return float(values.flatten().median())


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _summary(l1: float, trace: float, sigma: torch.Tensor, k: int, mean: float, median: float, var: float) -> dict:
    """The statistics from the nonzero-or-not singular values `sigma` (zeros implied up to k) and entry moments."""
    sigma = sigma.double()
    l2 = float(sigma.square().sum().sqrt())
    spectral = float(sigma.max()) if sigma.numel() else 0.0
    kept = torch.where(sigma < SV_FLOOR, torch.zeros_like(sigma), sigma)
    sv_mean = float(kept.sum()) / k
    sv_var = float(kept.square().sum()) / k - sv_mean**2
    return {"l1": l1, "l2": l2, "trace": trace, "spectral": spectral, "code_sparsity": _ratio(l1, l2),
            "computational_sparsity": _ratio(trace, spectral), "sv_mean": sv_mean, "sv_var": max(sv_var, 0.0),
            "w_mean": mean, "w_median": median, "w_var": var}  # fmt: skip


def dense_stats(matrix: torch.Tensor) -> dict[str, float]:
    """Statistics of a dense matrix (full SVD)."""
    sigma = torch.linalg.svdvals(matrix)
    return _summary(float(matrix.abs().sum()), float(matrix.diagonal().sum()), sigma, min(matrix.shape),
                    float(matrix.mean()), lower_median(matrix), float(matrix.var(correction=0)))  # fmt: skip


def low_rank_stats(u: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Statistics of M = u @ v (u: m x r, v: r x n) with singular values from the r x r core."""
    k = min(u.shape[0], v.shape[1])
    r_u = torch.linalg.qr(u).R
    r_v = torch.linalg.qr(v.T).R
    sigma = torch.linalg.svdvals(r_u @ r_v.T)
    trace = float((u[:k] * v[:, :k].T).sum())
    matrix = u @ v
    return _summary(float(matrix.abs().sum()), trace, sigma, k, float(matrix.mean()), lower_median(matrix),
                    float(matrix.var(correction=0)))  # fmt: skip


def diagonal_stats(v: torch.Tensor) -> dict[str, float]:
    """Statistics of diag(v) (n x n) from v alone: n entries v_i and n^2 - n zeros."""
    n = v.numel()
    total = n * n
    mean = float(v.sum()) / total
    var = float(v.double().square().sum()) / total - mean**2
    ordered = v.sort().values
    negatives, zeros = int((v < 0).sum()), total - n + int((v == 0).sum())
    middle = (total - 1) // 2
    nonzero = ordered[ordered != 0]
    if middle < negatives:
        median = float(nonzero[middle])
    elif middle < negatives + zeros:
        median = 0.0
    else:
        median = float(nonzero[middle - zeros])
    return _summary(float(v.abs().sum()), float(v.sum()), v.abs(), n, mean, median, max(var, 0.0))


def matrix_stats(matrix: Matrix) -> dict[str, float]:
    if matrix.factors is not None:
        return low_rank_stats(*matrix.factors)
    if matrix.diagonal is not None:
        return diagonal_stats(matrix.diagonal)
    return dense_stats(matrix.dense)


def bias_stats(bias: torch.Tensor) -> dict[str, float]:
    return {"b_mean": float(bias.mean()), "b_median": lower_median(bias), "b_var": float(bias.var(correction=0))}


def _average(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: math.fsum(row[key] for row in rows) / len(rows) for key in rows[0]}


@torch.no_grad()
def weight_statistics(model: torch.nn.Module) -> dict[str, float]:
    """The weight statistics (docs/methods.md "Training dynamics") of `model`'s trained matrices (and biases), averaged over matrices, plus their count."""
    matrices, biases = trained_matrices(model)
    stats = _average([matrix_stats(m) for m in matrices])
    if biases:
        stats.update(_average([bias_stats(b) for b in biases]))
    return {**stats, "n_matrices": float(len(matrices))}
