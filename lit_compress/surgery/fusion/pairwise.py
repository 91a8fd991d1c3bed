"""All pairs of one fusion group scored at once, as raw measures and as size-normalised distances.

:func:`pairwise` takes the ``n`` same-shape weights of one group stacked as ``(n, out, ...)`` and
returns two ``(n, n)`` float64 matrices on the weights' device (the training device): the raw
measure of :mod:`~lit_compress.surgery.fusion.similarity` for every pair (what the log keeps) and a
**normalised distance** in ``[0, 1]`` (0 = identical, lower = more alike) that does not grow with
the weights' magnitude or their number of elements, so pairs of different groups (a 576×576
attention projection and a 1536×576 FFN projection, a 16-channel and a 64-channel conv) can be
compared on one scale:

| measure | normalised distance |
|---|---|
| ``euclidean`` | ``‖W_i − W_j‖ / (‖W_i‖ + ‖W_j‖)`` |
| ``manhattan`` | ``Σ|W_i − W_j| / (Σ|W_i| + Σ|W_j|)`` |
| ``wasserstein`` | ``mean|sort W_i − sort W_j| / (mean|W_i| + mean|W_j|)`` |
| ``kl`` | ``1 − exp(−KL)`` of the softmaxes of ``vec W / s`` with ``s`` the group's RMS value (scale-free) |
| ``covariance`` | ``|‖C_i‖ − ‖C_j‖| / (‖C_i‖ + ‖C_j‖)`` |
| ``cosine`` | ``(1 − cos) / 2`` |
| ``cka`` | ``1 − CKA`` |

The cost is one Gram matrix (``euclidean``, ``cosine``, ``cka``), one sort per weight plus one pass
per pair (``wasserstein``, ``manhattan``), never a sort per pair. Inputs are read in their own
precision and accumulated in float64 where it matters (Gram matrices, sums).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lit_compress.surgery.fusion.similarity import check_measure

_EPS = 1e-12


def _flat(weights: Tensor) -> Tensor:
    """``(n, out, ...)`` → ``(n, numel)`` in at least float32."""
    w = weights.detach()
    if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    return w.reshape(w.shape[0], -1)


def _gram(x: Tensor) -> Tensor:
    """``x xᵀ`` in float64, ``(n, n)``."""
    return x.to(torch.float64) @ x.to(torch.float64).T


_BLOCK = 1 << 16  # columns per ``cdist`` call: float32 sums over a block, float64 across blocks


def _pairwise_l1(x: Tensor) -> Tensor:
    """``Σ|x_i − x_j|`` for all pairs (float64, ``(n, n)``), by blocks of columns."""
    out = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], _BLOCK):
        block = x[:, start : start + _BLOCK]
        out += torch.cdist(block[None], block[None], p=1)[0].to(torch.float64)
    return out


def _sorted_rows(x: Tensor) -> Tensor:
    """Each row sorted ascending (NumPy's sort on the CPU, several times faster than ``torch.sort``)."""
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _matrices(weights: Tensor) -> Tensor:
    """``(n, out, rest)``: each weight as a matrix (a 1-D weight as one row)."""
    w = weights.detach()
    return w.reshape(w.shape[0], 1, -1) if w.dim() < 3 else w.reshape(w.shape[0], w.shape[1], -1)


def _cosine(weights: Tensor) -> Tensor:
    m = _matrices(weights).to(torch.float64)
    rows = m.shape[1]
    unit = m / torch.linalg.vector_norm(m, dim=2, keepdim=True).clamp_min(_EPS)
    return _gram(unit.reshape(m.shape[0], -1)) / rows


def _cka(weights: Tensor) -> Tensor:
    m = _matrices(weights).to(torch.float64)
    if m.shape[1] == 1:  # a 1-D weight is one column
        m = m.transpose(1, 2)
    y = m - m.mean(dim=1, keepdim=True)
    n, rows, cols = y.shape
    feature_cost, example_cost = n * n * rows * cols * cols / 2, n * rows * rows * (cols + n)
    if feature_cost < example_cost:  # feature space: ‖Y_jᵀY_i‖² needs every pair's (cols, cols) product
        out = torch.empty(n, n, dtype=torch.float64, device=y.device)
        norms = torch.stack([torch.linalg.matrix_norm(y[i].T @ y[i]) for i in range(n)])
        for i in range(n):
            out[i] = torch.einsum("nrc,rd->ncd", y, y[i]).square().sum(dim=(1, 2))
    else:  # example space: ⟨K_i, K_j⟩ with K = Y Yᵀ, (rows, rows) per weight
        grams = torch.stack([y[i] @ y[i].T for i in range(n)]).reshape(n, -1)
        out = grams @ grams.T
        norms = torch.linalg.vector_norm(grams, dim=1)
    return out / (norms[:, None] * norms[None, :]).clamp_min(_EPS)


def _covariance_norms(weights: Tensor) -> Tensor:
    from lit_compress.surgery.fusion.similarity import _covariance_norm

    return torch.stack([_covariance_norm(w) for w in weights])


def _kl(weights: Tensor, scale: Tensor | None = None) -> Tensor:
    """``KL(p_i ‖ p_j)`` for all pairs, ``p = softmax(vec W / scale)``."""
    x = _flat(weights).to(torch.float64)
    if scale is not None:
        x = x / scale
    log_p = F.log_softmax(x, dim=1)
    p = log_p.exp()
    entropy_term = (p * log_p).sum(dim=1)  # Σ p_i log p_i
    return entropy_term[:, None] - p @ log_p.T


def pairwise(measure: str, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The raw measure and the normalised distance of every pair of ``weights`` ``(n, out, ...)``.

    Returns two float64 ``(n, n)`` matrices on ``weights.device``: ``raw[i, j]`` equals
    :func:`~lit_compress.surgery.fusion.similarity.score` ``(measure, weights[i], weights[j])`` (for
    ``kl``, ``i`` is the first argument) and ``distance[i, j]`` the normalised distance of the
    module docstring (symmetric; ``kl`` uses the mean of both directions).
    """
    check_measure(measure)
    if weights.dim() < 2 or weights.shape[0] < 1:
        raise ValueError(f"pairwise: weights must be stacked as (n, ...), got shape {tuple(weights.shape)}.")
    x = _flat(weights)
    if measure == "euclidean":
        g = _gram(x)
        sq = g.diagonal()
        raw = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0).sqrt()
        norms = sq.clamp_min(0).sqrt()
        dist = raw / (norms[:, None] + norms[None, :]).clamp_min(_EPS)
    elif measure == "manhattan":
        raw = _pairwise_l1(x)
        sums = x.abs().sum(dim=1, dtype=torch.float64)
        dist = raw / (sums[:, None] + sums[None, :]).clamp_min(_EPS)
    elif measure == "wasserstein":
        s = _sorted_rows(x)
        raw = _pairwise_l1(s) / x.shape[1]
        means = x.abs().mean(dim=1, dtype=torch.float64)
        dist = raw / (means[:, None] + means[None, :]).clamp_min(_EPS)
    elif measure == "kl":
        raw = _kl(weights)
        rms = x.to(torch.float64).square().mean().sqrt().clamp_min(_EPS)
        scaled = _kl(weights, rms).clamp_min(0)
        dist = 1 - torch.exp(-(scaled + scaled.T) / 2)
    elif measure == "covariance":
        c = _covariance_norms(weights)
        raw = (c[:, None] - c[None, :]).abs()
        dist = raw / (c[:, None] + c[None, :]).clamp_min(_EPS)
    elif measure == "cosine":
        raw = _cosine(weights)
        dist = ((1 - raw) / 2).clamp(0, 1)
    else:  # cka
        raw = _cka(weights)
        dist = (1 - raw).clamp(0, 1)
    dist = dist.clone()
    dist.fill_diagonal_(0)
    return raw, dist


def normalised_distance(measure: str, a: Tensor, b: Tensor) -> float:
    """The normalised distance between two same-shape weights (see :func:`pairwise`)."""
    if a.shape != b.shape:
        raise ValueError(f"normalised_distance: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}.")
    return float(pairwise(measure, torch.stack([a.detach(), b.detach().to(a.device, a.dtype)]))[1][0, 1])


__all__ = ["normalised_distance", "pairwise"]
