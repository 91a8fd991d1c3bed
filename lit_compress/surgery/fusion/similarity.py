"""Data-free similarity between two same-shape weights (Layer Fusion).

Every measure reads a weight ``W`` of shape ``(out, ...)`` as the matrix ``(out, rest)`` (a 1-D
weight, e.g. a norm's, as one row) and computes in float64. Biases are not compared.

| name | kind | definition |
|---|---|---|
| ``cosine`` | similarity | mean over rows ``r`` of ``cos(W_i[r], W_j[r])`` |
| ``covariance`` | distance | ``| ‖C_i‖_F − ‖C_j‖_F |`` with ``C = X·Xᵀ/(d − 1)``, ``X`` = ``W`` with each of its ``d``
  columns standardised over the rows (only centred when there is one row) |
| ``cka`` | similarity | linear CKA with rows as examples: ``‖Y_jᵀY_i‖²_F / (‖Y_iᵀY_i‖_F ‖Y_jᵀY_j‖_F)``, ``Y`` = ``W``
  with centred columns; a 1-D weight is one column |
| ``euclidean`` | distance | ``‖W_i − W_j‖_F`` |
| ``manhattan`` | distance | ``Σ|W_i − W_j|`` |
| ``kl`` | distance | ``KL(softmax(vec W_i) ‖ softmax(vec W_j))`` (asymmetric: ``i`` is the layer first in model
  order) |
| ``wasserstein`` | distance | the exact 1-Wasserstein (earth mover's) distance between the empirical distributions
  of the two weights' values: ``mean|sort(vec W_i) − sort(vec W_j)|`` |

Similarities rank pairs in descending order, distances in ascending order (:func:`rank_key`).

Deviations from the authors' code, on purpose (the authors' published code differs here):

- ``covariance``: the code's score is the *signed* difference ``‖C_i‖ − ‖C_j‖`` (×1e3), which makes a
  pair's rank depend on the order of its layers; we use its absolute value (the 1e3 scale does not
  change a ranking and is dropped).
- ``cka``: the code computes the uncentred ``⟨W_i, W_j⟩_F / (‖W_i‖‖W_j‖)`` (the cosine of the flattened
  weights); we compute the real (centred, linear) CKA.
- ``wasserstein``: the code samples 100 indices of ``softmax(vec W)``, builds a squared-difference
  cost between those probability values and averages pyemd's EMD over 10 samples. We compute the
  exact 1-D earth mover's distance between the two weights' value distributions by sorting (two
  same-shape weights have equally many atoms, so the optimal transport plan is the sorted
  matching), in torch, with no sampling and no dependency (POT and pyemd are not needed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from lit_compress.errors import allowed

_EPS = 1e-12


def as_matrix(weight: Tensor) -> Tensor:
    """``weight`` as a float64 ``(out, rest)`` matrix (a 1-D weight as one row)."""
    w = weight.detach().to(torch.float64)
    return w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)


def cosine(a: Tensor, b: Tensor) -> float:
    """Mean over rows of the cosine between the rows of ``a`` and ``b``."""
    x, y = as_matrix(a), as_matrix(b)
    return float(F.cosine_similarity(x, y, dim=1, eps=_EPS).mean())


def _covariance_norm(w: Tensor) -> Tensor:
    x = as_matrix(w)
    rows, cols = x.shape
    x = x - x.mean(dim=0, keepdim=True) if rows > 1 else x - x.mean()
    if rows > 1:
        x = x / x.std(dim=0, keepdim=True).clamp_min(_EPS)
    c = x @ x.T / max(cols - 1, 1)  # (rows, rows)
    return torch.linalg.matrix_norm(c)


def covariance(a: Tensor, b: Tensor) -> float:
    """``| ‖C_a‖_F − ‖C_b‖_F |`` with ``C = X·Xᵀ/(d−1)`` of the column-standardised weight."""
    return float((_covariance_norm(a) - _covariance_norm(b)).abs())


def cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA between the weights, rows as examples (a 1-D weight is one column)."""
    x, y = as_matrix(a), as_matrix(b)
    if x.shape[0] == 1:
        x, y = x.T, y.T
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if x.shape[1] <= x.shape[0]:  # feature-space form, (d, d) products
        cross = (y.T @ x).square().sum()
        norm_x, norm_y = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    else:  # example-space form with the (n, n) Gram matrices: ‖YᵀX‖² = ⟨XXᵀ, YYᵀ⟩
        gx, gy = x @ x.T, y @ y.T
        cross = (gx * gy).sum()
        norm_x, norm_y = torch.linalg.matrix_norm(gx), torch.linalg.matrix_norm(gy)
    return float(cross / (norm_x * norm_y).clamp_min(_EPS))


def euclidean(a: Tensor, b: Tensor) -> float:
    """Frobenius norm of the difference."""
    return float(torch.linalg.vector_norm(as_matrix(a) - as_matrix(b)))


def manhattan(a: Tensor, b: Tensor) -> float:
    """Sum of absolute differences."""
    return float((as_matrix(a) - as_matrix(b)).abs().sum())


def kl(a: Tensor, b: Tensor) -> float:
    """``KL(softmax(vec a) ‖ softmax(vec b))``."""
    log_p = F.log_softmax(as_matrix(a).reshape(-1), dim=0)
    log_q = F.log_softmax(as_matrix(b).reshape(-1), dim=0)
    return float((log_p.exp() * (log_p - log_q)).sum())


def wasserstein(a: Tensor, b: Tensor) -> float:
    """Exact 1-Wasserstein distance between the empirical distributions of the two weights' values."""
    x = torch.sort(as_matrix(a).reshape(-1)).values
    y = torch.sort(as_matrix(b).reshape(-1)).values
    if x.numel() != y.numel():
        raise allowed("weights", (x.numel(), y.numel()), "must have the same number of elements")
    return float((x - y).abs().mean())


MEASURES: dict[str, tuple[Callable[[Tensor, Tensor], float], str]] = {
    "cosine": (cosine, "similarity"),
    "covariance": (covariance, "distance"),
    "cka": (cka, "similarity"),
    "euclidean": (euclidean, "distance"),
    "manhattan": (manhattan, "distance"),
    "kl": (kl, "distance"),
    "wasserstein": (wasserstein, "distance"),
}


def check_measure(measure: str, argument: str = "measure") -> str:
    if measure not in MEASURES:
        raise allowed(argument, measure, f"must be one of {', '.join(repr(m) for m in MEASURES)}")
    return measure


def is_similarity(measure: str) -> bool:
    """True for similarities (higher = more alike), False for distances."""
    return MEASURES[check_measure(measure)][1] == "similarity"


def score(measure: str, a: Tensor, b: Tensor) -> float:
    """The measure ``measure`` between two same-shape weights."""
    fn, _ = MEASURES[check_measure(measure)]
    if a.shape != b.shape:
        raise allowed("weights", (tuple(a.shape), tuple(b.shape)), "must have the same shape")
    return fn(a, b)


def rank_key(measure: str) -> Callable[[float], float]:
    """Sort key putting the most alike first: similarities descending, distances ascending."""
    return (lambda s: -s) if is_similarity(measure) else (lambda s: s)


__all__ = [
    "MEASURES",
    "as_matrix",
    "check_measure",
    "cka",
    "cosine",
    "covariance",
    "euclidean",
    "is_similarity",
    "kl",
    "manhattan",
    "rank_key",
    "score",
    "wasserstein",
]
