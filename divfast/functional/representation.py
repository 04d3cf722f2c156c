"""Representation similarity: unbiased HSIC and minibatch CKA (paper Eq. 6) between layers and members.

Linear CKA of two representations X (n x p) and Y (n x q) of the same n samples compares their Gram
matrices K = X X^T and L = Y Y^T:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

With the unbiased HSIC estimator (Song et al. 2012) on each minibatch, averaging the three HSIC terms
over batches before the ratio gives the minibatch CKA of Nguyen, Raghu & Kornblith (2021), which
converges to the full-data value and needs no n x n matrix over the whole data set. The unbiased
estimator zeroes the diagonals (K~) and needs n >= 4:

    HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))

For G Gram matrices at once (every (member, layer) of an ensemble), all G x G terms are one matrix
product of the flattened K~ plus products of their row sums: :func:`hsic_matrix_from_grams`. This is
what the fused ``divfast::hsic`` kernel computes in one read of the Grams.

Zero-variance features (a constant layer) have HSIC(K, K) = 0; their CKA with anything is defined as
0 (not NaN), and documented so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from divfast._ops.hsic import hsic
from divfast.errors import DivfastError

MIN_BATCH = 4  # the unbiased estimator divides by n (n - 3)


def gram_matrices(features: Sequence[torch.Tensor], kernel: str = "linear",
                  bandwidth: float = 0.5) -> torch.Tensor:
    """Gram matrices ``(G, n, n)`` float64 of G representations of the same n samples.

    Args:
        features: G tensors ``(n, ...)``, flattened per sample.
        kernel: ``"linear"`` (``X X^T``) or ``"rbf"`` (``exp(-d^2 / (2 s^2))`` with ``s`` =
            ``bandwidth`` times the median pairwise distance of that representation).
        bandwidth: the RBF width as a fraction of the median distance.
    """
    if kernel not in ("linear", "rbf"):
        raise DivfastError(f"kernel: expected 'linear' or 'rbf', got {kernel!r}")
    if not features:
        raise DivfastError("features: expected at least one representation")
    n = features[0].shape[0]
    grams = []
    for i, f in enumerate(features):
        if f.shape[0] != n:
            raise DivfastError(f"features: representation {i} has {f.shape[0]} samples, the first has {n}")
        x = f.reshape(n, -1).to(torch.float64)
        gram = x @ x.T
        grams.append(rbf_from_linear_gram(gram, bandwidth) if kernel == "rbf" else gram)
    return torch.stack(grams)


def rbf_from_linear_gram(gram: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``exp(-d^2 / (2 s^2))`` from a float64 linear Gram ``(n, n)``: d the pairwise distances,
    ``s`` = ``bandwidth`` x the median off-diagonal distance; all ones when ``s`` = 0 (or n < 2).
    No host synchronisation (GramCapture calls it inside the forward pass)."""
    n = gram.shape[0]
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)  # (n, n)
    if n < 2:
        return torch.ones_like(d2)
    off = d2.flatten()[1:].view(n - 1, n + 1)[:, :-1]  # the n (n - 1) off-diagonal entries
    scale = bandwidth * off.sqrt().median()
    positive = scale > 0
    denom = torch.where(positive, 2.0 * scale * scale, torch.ones_like(scale))
    return torch.where(positive, torch.exp(-d2 / denom), torch.ones_like(d2))


def hsic_matrix_from_grams(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair of the G Gram matrices ``(G, n, n)`` -> ``(G, G)`` float64.

    The fused ``divfast::hsic`` kernel (reference: :func:`divfast._ops.reference.hsic`): one read of
    the Grams, the U-centring folded into the inner products, no per-pair loop. Needs n >= 4.
    """
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise DivfastError(f"grams: expected (G, n, n), got {tuple(grams.shape)}")
    n = grams.shape[-1]
    if n < MIN_BATCH:
        raise DivfastError(f"batch: the unbiased HSIC needs n >= {MIN_BATCH} samples, got {n}")
    try:
        return hsic(grams)
    except ValueError as exc:  # NaN or infinite features, or float64 overflow: one clear line
        raise DivfastError(f"features: {exc}") from None


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """``(G, G)`` HSIC sums -> CKA ``HSIC_ij / sqrt(HSIC_ii HSIC_jj)``, clamped to [-1, 1]; pairs with a
    zero-variance representation (HSIC_ii <= 0) get 0."""
    diag = hsic.diagonal().clamp_min(0.0)
    denom = torch.sqrt(diag[:, None] * diag[None, :])
    out = torch.where(denom > 0, hsic / torch.where(denom > 0, denom, 1.0), torch.zeros_like(hsic))
    return out.clamp(-1.0, 1.0)


def hsic_matrix(features: Sequence[torch.Tensor], kernel: str = "linear", bandwidth: float = 0.5) -> torch.Tensor:
    """Unbiased HSIC ``(G, G)`` float64 between G representations of one batch (n >= 4 samples).

    Example:
        >>> x = torch.randn(16, 8)
        >>> hsic_matrix([x, 2 * x]).shape
        torch.Size([2, 2])
    """
    return hsic_matrix_from_grams(gram_matrices(features, kernel, bandwidth))


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", debiased: bool = True,
        bandwidth: float = 0.5) -> float:
    """CKA (paper Eq. 6) of two representations ``(n, ...)`` of the same samples.

    Args:
        x, y: features, flattened per sample.
        kernel: ``"linear"`` or ``"rbf"``.
        debiased: the unbiased HSIC estimator (needs n >= 4); else the biased full-data estimator
            (centring matrix H = I - 11^T/n: ``HSIC = tr(K H L H) / (n-1)^2``).
        bandwidth: RBF width as a fraction of the median distance.

    Returns:
        A float in [-1, 1] (unbiased CKA can dip slightly below 0 for unrelated features); 0 when
        either representation has zero variance.

    Example:
        >>> x = torch.randn(32, 10)
        >>> round(cka(x, x @ torch.linalg.qr(torch.randn(10, 10))[0]), 6)  # rotation-invariant
        1.0
    """
    grams = gram_matrices([x, y], kernel, bandwidth)
    if debiased:
        hsic = hsic_matrix_from_grams(grams)
    else:
        n = grams.shape[-1]
        centred = grams - grams.mean(dim=1, keepdim=True)
        centred = centred - centred.mean(dim=2, keepdim=True)
        flat = centred.reshape(2, -1)
        hsic = flat @ flat.T / max(n - 1, 1) ** 2
    return float(cka_from_hsic(hsic)[0, 1])


def depth_alignment(layer_counts: Sequence[int]) -> list[list[int]]:
    """For members with ``layer_counts[i]`` chosen layers each, the layer index of every member at each
    of ``D = min(layer_counts)`` depths: member i's layer nearest relative depth ``d / (D - 1)``, i.e.
    ``round(d (L_i - 1) / (D - 1))`` (members with the same count line up index by index; depth 0 is
    every member's first layer and depth D - 1 its last). Returns ``D`` rows of one index per member.

    Example:
        >>> depth_alignment([5, 9])
        [[0, 0], [1, 2], [2, 4], [3, 6], [4, 8]]
    """
    if not layer_counts or min(layer_counts) < 1:
        raise DivfastError(f"layers: every member needs at least one layer, got counts {list(layer_counts)}")
    depths = min(layer_counts)
    if depths == 1:
        return [[0 for _ in layer_counts]]
    return [[int(math.floor(d * (count - 1) / (depths - 1) + 0.5)) for count in layer_counts]
            for d in range(depths)]


def cross_member_cka_by_depth(cka_matrix: torch.Tensor | Sequence[Sequence[float]],
                              layer_counts: Sequence[int]) -> list[dict]:
    """Mean CKA across members at each depth of :func:`depth_alignment`.

    Args:
        cka_matrix: ``(G, G)`` CKA of every (member, layer), member-major, ``G = sum(layer_counts)``.
        layer_counts: layers per member.

    Returns:
        One ``{"depth", "relative_depth", "indices", "mean_cross_member_cka"}`` per depth: the mean
        over member pairs i < j of the CKA between member i's and member j's layer at that depth
        (None with a single member).

    Example:
        >>> rows = cross_member_cka_by_depth(torch.eye(4), [2, 2])
        >>> [r["mean_cross_member_cka"] for r in rows]
        [0.0, 0.0]
    """
    cka_matrix = torch.as_tensor(cka_matrix, dtype=torch.float64)
    g = sum(layer_counts)
    if tuple(cka_matrix.shape) != (g, g):
        raise DivfastError(f"cka_matrix: expected {g} x {g} (the layers of every member), got "
                           f"{tuple(cka_matrix.shape)}")
    offsets = [sum(layer_counts[:i]) for i in range(len(layer_counts))]
    alignment = depth_alignment(layer_counts)
    rows = []
    for d, indices in enumerate(alignment):
        flat = [offsets[i] + k for i, k in enumerate(indices)]
        values = [float(cka_matrix[flat[i], flat[j]]) for i in range(len(flat)) for j in range(i + 1, len(flat))]
        rows.append({"depth": d, "relative_depth": d / (len(alignment) - 1) if len(alignment) > 1 else 0.0,
                     "indices": indices,
                     "mean_cross_member_cka": sum(values) / len(values) if values else None})
    return rows
