"""Attribution diversity (paper Eq. 7): how differently the members of an ensemble attribute their
decisions to the input pixels, and the same for any subset of a member pool, from one Gram matrix.

For each sample, the variance across members of every attribution value (channel, pixel) is summed;
the diversity is the mean of that sum over samples:

    D = (1/N) sum_n sum_{c,p} Var_m a_{m,n,c,p}

The sufficient statistics are sums (identity zero): the per-sample variance total, the sample
count and the member Gram ``G_ij = sum_{n,c,p} c_i c_j`` (float64) of the maps centred at each pixel
on the pool's mean, ``c_m = a_m - mean_k a_k`` (centring keeps it free of cancellation; a variance
is blind to the common shift). Batches, shards and processes add them. With the population variance
(ddof 0, the default) the Gram alone gives the diversity of any subset S of the members:

    sum Var_S = (1/|S|) sum_{i in S} G_ii - (1/|S|^2) sum_{i,j in S} G_ij

so the 364 three-member ensembles of a 14-model pool need the maps of 14 models, not of 364
ensembles (precision: the absolute error is about 1e-7 of the pool's spread for float32 maps; see
:meth:`divfast.metrics.AttributionDiversity.for_subset`). Pairwise: the diversity of {i, j} is ``(G_ii + G_jj - 2 G_ij) / (2 (2 - ddof))`` per
sample (the squared distance of the two maps, over 4 or 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divfast._ops.attribution_stats import attribution_stats


def attribution_stats_state(attributions: torch.Tensor, abs: bool = True, normalize: str = "none",
                            ddof: int = 0) -> dict[str, torch.Tensor]:
    """The additive state of one batch of maps ``(M, B, C, H, W)``: ``variance_sum`` (float64
    scalar), ``n_samples`` (int64 scalar), ``gram`` (M, M) float64."""
    variance, gram = attribution_stats(attributions, abs, normalize, ddof)
    return {"variance_sum": variance.sum(), "gram": gram,
            "n_samples": torch.tensor(variance.shape[0], dtype=torch.int64, device=gram.device)}


def subset_diversity(gram: torch.Tensor, n_samples: int, members: Sequence[int]) -> float:
    """Eq. 7 for the subset ``members`` of the pool, from the pool's Gram (population variance).

    Args:
        gram: ``(M, M)`` float64 Gram of the pool's maps over ``n_samples`` samples.
        n_samples: how many samples the Gram sums over.
        members: indices into the pool (at least one, no repeats).

    Returns:
        The mean over samples of the summed variance across the subset's members; NaN without
        samples.
    """
    idx = list(members)
    m = gram.shape[0]
    if not idx or len(set(idx)) != len(idx) or not all(0 <= i < m for i in idx):
        raise ValueError(f"`members` must be distinct indices in [0, {m}), got {list(members)}")
    if n_samples == 0:
        return float("nan")
    sub = gram[idx][:, idx]
    k = len(idx)
    total = sub.diagonal().sum() / k - sub.sum() / (k * k)
    return float(total.clamp_min(0.0)) / n_samples


def pairwise_attribution_diversity(gram: torch.Tensor, n_samples: int, ddof: int = 0) -> torch.Tensor:
    """``(M, M)`` float64: the diversity of every member pair (Eq. 7 with M = 2, the same ``ddof``),
    zero diagonal: the pair's summed squared distance over ``2 (2 - ddof)``, per sample."""
    diag = gram.diagonal()
    pair = (diag[:, None] + diag[None, :] - 2.0 * gram) / (2.0 * (2 - ddof))
    if n_samples == 0:
        return torch.full_like(pair, float("nan"))
    return pair.clamp_min(0.0) / n_samples


def attribution_measures(state: dict[str, torch.Tensor], ddof: int = 0) -> dict:
    """Finalises a state: ``diversity`` (Eq. 7, the mean over samples of the summed variance),
    ``n_samples``, ``pairwise`` (M x M list) and ``gram`` (M x M list), as plain Python numbers."""
    n = int(state["n_samples"])
    gram = state["gram"]
    return {
        "diversity": float(state["variance_sum"]) / n if n else float("nan"),
        "n_samples": n,
        "ddof": ddof,
        "pairwise": pairwise_attribution_diversity(gram, n, ddof).tolist(),
        "gram": gram.tolist(),
    }


def attribution_diversity(attributions: torch.Tensor, abs: bool = True, normalize: str = "none",
                          ddof: int = 0) -> dict:
    """Attribution diversity of an ensemble (paper Eq. 7) from its members' maps.

    Args:
        attributions: ``(M, N, C, H, W)`` maps of M members for N samples (e.g. from
            :func:`divfast.attribution.member_attributions`), float16/bfloat16/float32/float64.
        abs: compare absolute attributions (the Saliency convention).
        normalize: ``"none"``, ``"l1"``, ``"l2"`` or ``"max"`` per map before comparing.
        ddof: 0 (population variance across members, default) or 1.

    Returns:
        ``{"diversity", "n_samples", "ddof", "pairwise", "gram"}`` (see :func:`attribution_measures`).

    Example:
        >>> maps = torch.rand(3, 8, 3, 16, 16)
        >>> d = attribution_diversity(maps, normalize="l1")
        >>> d["n_samples"], len(d["pairwise"])
        (8, 3)
    """
    return attribution_measures(attribution_stats_state(attributions, abs, normalize, ddof), ddof)


def method_agreement(pairwise_by_method: dict[str, torch.Tensor]) -> dict:
    """How far attribution methods agree on which member pairs are diverse (paper Figure 9).

    Args:
        pairwise_by_method: method name -> ``(M, M)`` pairwise diversity of the same members.

    Returns:
        ``{"pairs": [(i, j), ...], "normalized": {method: [score per pair]}, "correlation":
        {method: {method: Pearson r}}, "mean_correlation": float}``; scores are divided by each
        method's largest pair score (so they lie in [0, 1]); the mean is over distinct methods.
        Pearson r is NaN with fewer than two pairs (M = 2) or when a method's scores are constant;
        ``mean_correlation`` is NaN with one method or when any r is NaN.
    """
    if len(pairwise_by_method) < 1:
        raise ValueError("`pairwise_by_method` needs at least one method")
    first = next(iter(pairwise_by_method.values()))
    m = first.shape[0]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    rows, cols = zip(*pairs) if pairs else ((), ())
    normalized = {}
    for name, pairwise in pairwise_by_method.items():
        if pairwise.shape != (m, m):
            raise ValueError(f"`pairwise_by_method`[{name!r}] has shape {tuple(pairwise.shape)}, "
                             f"expected ({m}, {m})")
        scores = torch.as_tensor(pairwise, dtype=torch.float64)[list(rows), list(cols)]
        top = scores.max() if scores.numel() else torch.tensor(0.0, dtype=torch.float64)
        normalized[name] = (scores / top if top > 0 else scores).tolist()
    names = list(normalized)
    corr = {a: {b: _pearson(normalized[a], normalized[b]) for b in names} for a in names}
    off = [corr[a][b] for a in names for b in names if a < b]
    return {"pairs": pairs, "normalized": normalized, "correlation": corr,
            "mean_correlation": sum(off) / len(off) if off else float("nan")}


def _pearson(x: list[float], y: list[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
