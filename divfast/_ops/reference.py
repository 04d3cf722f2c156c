"""Pure-PyTorch references of every divfast kernel: the oracle the tests compare kernels with, and the
fallback when the compiled extension is missing. Vectorised, but written for clarity over speed.
"""

from __future__ import annotations

import torch

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_pair_counts_args(predictions: torch.Tensor, target: torch.Tensor, num_classes: int) -> bool:
    """The argument checks of ``divfast::pair_counts`` (same messages as csrc/checks.h)."""
    if predictions.dim() not in (2, 3):
        raise ValueError(
            "pair_counts: `predictions` must be logits (M, B, C) or labels (M, B), got shape "
            f"{list(predictions.shape)}"
        )
    if predictions.shape[0] < 1:
        raise ValueError("pair_counts: `predictions` needs at least one member (M >= 1)")
    logits = predictions.dim() == 3
    if logits:
        if predictions.dtype not in _LOGIT_DTYPES:
            raise TypeError(
                "pair_counts: logits `predictions` must be float16, bfloat16, float32 or float64, "
                f"got {predictions.dtype}"
            )
        if predictions.shape[2] < 1:
            raise ValueError("pair_counts: logits `predictions` need C >= 1 classes")
        if num_classes not in (-1, predictions.shape[2]):
            raise ValueError(
                f"pair_counts: `num_classes` ({num_classes}) must be -1 or equal the logits' C "
                f"({predictions.shape[2]})"
            )
    else:
        if predictions.dtype != torch.int64:
            raise TypeError(
                f"pair_counts: label `predictions` (M, B) must be int64, got {predictions.dtype}"
            )
        if num_classes != -1 and num_classes < 1:
            raise ValueError(
                f"pair_counts: `num_classes` must be -1 (unchecked) or >= 1, got {num_classes}"
            )
    if target.dim() != 1:
        raise ValueError(f"pair_counts: `target` must be a 1-D tensor (B,), got shape "
                         f"{list(target.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"pair_counts: `target` must be int64, got {target.dtype}")
    if target.shape[0] != predictions.shape[1]:
        raise ValueError(
            f"pair_counts: `target` has {target.shape[0]} samples but `predictions` has "
            f"B = {predictions.shape[1]}"
        )
    if target.device != predictions.device:
        raise ValueError(
            f"pair_counts: `target` is on {target.device} but `predictions` on {predictions.device}"
        )
    return logits


def _out_of_range(x: torch.Tensor, num_classes: int) -> bool:
    if x.numel() == 0:
        return False
    return bool((x < 0).any() or (num_classes > 0 and (x >= num_classes).any()))


def pair_counts(
    predictions: torch.Tensor, target: torch.Tensor, num_classes: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``divfast::pair_counts``; see :func:`divfast._ops.pair_counts.pair_counts`."""
    logits = check_pair_counts_args(predictions, target, num_classes)
    m, b = predictions.shape[:2]
    bound = predictions.shape[2] if logits else num_classes
    if logits:
        if predictions.numel() and torch.isnan(predictions).any():
            raise ValueError("pair_counts: logits `predictions` contain NaN")
        labels = predictions.argmax(dim=-1) if b else predictions.new_zeros((m, 0), dtype=torch.long)
    else:
        labels = predictions
        if _out_of_range(labels, bound):
            raise ValueError(f"pair_counts: label `predictions` have a value outside [0, {bound})")
    if _out_of_range(target, bound):
        raise ValueError(
            f"pair_counts: `target` has a label outside [0, {bound if bound > 0 else 'inf'})"
        )
    correct = labels == target  # (M, B) bool
    c = correct.to(torch.float64)  # float64 GEMMs are exact for counts below 2**53 (and run on CUDA)
    w = 1.0 - c
    cells = [c @ c.T, c @ w.T, w @ c.T, w @ w.T]  # N11, N10, N01, N00: (M, M) each
    counts = torch.stack(cells, dim=-1).round().to(torch.long).view(m, m, 2, 2)
    agreement = (labels[:, None, :] == labels[None, :, :]).sum(dim=-1)  # (M, M)
    histogram = torch.bincount(correct.sum(dim=0), minlength=m + 1)
    return counts, agreement, histogram, correct


ATTRIBUTION_NORMALIZATIONS = ("none", "l1", "l2", "max")
_MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attribution_stats_args(attributions: torch.Tensor, normalize: str, ddof: int) -> None:
    """The argument checks of ``divfast::attribution_stats`` (same messages as csrc/checks.h)."""
    if attributions.dim() < 2:
        raise ValueError("attribution_stats: `attributions` must be (M, B, ...) maps of M members for "
                         f"B samples, got shape {list(attributions.shape)}")
    if attributions.dtype not in _MAP_DTYPES:
        raise TypeError("attribution_stats: `attributions` must be float16, bfloat16, float32 or "
                        f"float64, got {attributions.dtype}")
    if attributions.shape[0] < 1:
        raise ValueError("attribution_stats: `attributions` needs at least one member (M >= 1)")
    if normalize not in ATTRIBUTION_NORMALIZATIONS:
        raise ValueError(f"attribution_stats: `normalize` must be one of none, l1, l2, max, got "
                         f"{normalize!r}")
    if ddof not in (0, 1):
        raise ValueError(f"attribution_stats: `ddof` must be 0 or 1, got {ddof}")
    if ddof >= attributions.shape[0]:
        raise ValueError(f"attribution_stats: `ddof` = {ddof} needs more than {ddof} member(s), got "
                         f"M = {attributions.shape[0]}")


def attribution_maps(attributions: torch.Tensor, abs: bool, normalize: str) -> torch.Tensor:
    """The maps the statistics are taken of, float64 (M, B, D): ``|a|`` if ``abs``, each map then
    divided by its l1 norm, l2 norm or largest absolute value (a map whose norm is 0 stays 0).
    Differentiable: the op's backward runs through it."""
    m, b = attributions.shape[:2]
    d = 1
    for size in attributions.shape[2:]:
        d *= size
    x = attributions.reshape(m, b, d).to(torch.float64)
    if abs:
        x = x.abs()
    if normalize == "none" or x.shape[-1] == 0:
        return x
    if normalize == "l1":
        norm = x.abs().sum(dim=-1, keepdim=True)
    elif normalize == "l2":
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    else:
        norm = x.abs().amax(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), torch.zeros_like(x))


def attribution_stats(attributions: torch.Tensor, abs: bool = True, normalize: str = "none",
                      ddof: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``divfast::attribution_stats``; see
    :func:`divfast._ops.attribution_stats.attribution_stats`."""
    check_attribution_stats_args(attributions, normalize, ddof)
    if attributions.numel() and not torch.isfinite(attributions).all():
        raise ValueError("attribution_stats: `attributions` contain NaN or infinity")
    x = attribution_maps(attributions, abs, normalize)  # (M, B, D) float64
    m = x.shape[0]
    centred = x - x.mean(dim=0, keepdim=True)  # each pixel centred on the members' mean
    variance = (centred * centred).sum(dim=(0, 2)) / (m - ddof)  # (B,)
    flat = centred.reshape(m, -1)
    return variance, flat @ flat.T  # (B,), (M, M)


_GRAM_DTYPES = _MAP_DTYPES


def check_hsic_args(grams: torch.Tensor) -> None:
    """The argument checks of ``divfast::hsic`` (same messages as csrc/checks.h)."""
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError("hsic: `grams` must be G square Gram matrices (G, n, n) of the same n samples, "
                         f"got shape {list(grams.shape)}")
    if grams.dtype not in _GRAM_DTYPES:
        raise TypeError(f"hsic: `grams` must be float16, bfloat16, float32 or float64, got {grams.dtype}")
    if grams.shape[1] < 4:
        raise ValueError("hsic: the unbiased HSIC needs n >= 4 samples per batch, got `grams` of "
                         f"n = {grams.shape[1]}")


def hsic_expression(grams: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC ``(G, G)`` float64 of the symmetric parts of ``grams`` ``(G, n, n)``,
    without checks: the product of the zero-diagonal Grams, flattened, plus the products of their
    row sums and totals. Differentiable; the op's backward runs through it."""
    g, n = grams.shape[0], grams.shape[-1]
    k = grams.to(torch.float64)
    k = (k + k.transpose(1, 2)) / 2
    k = k * (1.0 - torch.eye(n, dtype=torch.float64, device=k.device))  # K~: the diagonal zeroed
    flat = k.reshape(g, n * n)
    rows = k.sum(dim=2)  # (G, n): K~ 1
    totals = rows.sum(dim=1)  # (G,): 1' K~ 1
    return (flat @ flat.T + totals[:, None] * totals[None, :] / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))


def hsic(grams: torch.Tensor) -> torch.Tensor:
    """Reference of ``divfast::hsic``: the unbiased HSIC ``(G, G)`` float64 of every pair of the
    symmetric parts of G Gram matrices ``(G, n, n)`` (Song et al. 2012); see
    :func:`divfast._ops.hsic.hsic`."""
    check_hsic_args(grams)
    if grams.numel() and not torch.isfinite(grams).all():
        raise ValueError("hsic: `grams` contain NaN or infinity")
    out = hsic_expression(grams)
    if not torch.isfinite(out).all():
        raise ValueError("hsic: the products of `grams` overflow float64 (entries near 1e154); scale "
                         "the features down")
    return out


SWEEP_RULES = ("average", "vote", "median", "geometric")
SWEEP_RANK_CAP = 5  # ranks are counted up to here: top-1 is rank 0, top-5 rank < 5


def check_ensemble_sweep_args(logits: torch.Tensor, target: torch.Tensor, subsets: torch.Tensor,
                              rule: str) -> None:
    """The argument checks of ``divfast::ensemble_sweep`` (same messages as csrc/checks.h)."""
    if logits.dim() != 3:
        raise ValueError("ensemble_sweep: `logits` must be (K, N, C) logits of K members, got shape "
                         f"{list(logits.shape)}")
    if logits.dtype not in _MAP_DTYPES:
        raise TypeError("ensemble_sweep: `logits` must be float16, bfloat16, float32 or float64, got "
                        f"{logits.dtype}")
    if logits.shape[0] < 1 or logits.shape[2] < 1:
        raise ValueError("ensemble_sweep: `logits` needs K >= 1 members and C >= 1 classes, got shape "
                         f"{list(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[1]:
        raise ValueError(f"ensemble_sweep: `target` must be (N,) with N = {logits.shape[1]}, got shape "
                         f"{list(target.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"ensemble_sweep: `target` must be int64, got {target.dtype}")
    if subsets.dim() != 2 or subsets.shape[1] < 1:
        raise ValueError("ensemble_sweep: `subsets` must be (S, k) member indices with k >= 1, got shape "
                         f"{list(subsets.shape)}")
    if subsets.dtype != torch.int64:
        raise TypeError(f"ensemble_sweep: `subsets` must be int64, got {subsets.dtype}")
    if subsets.shape[1] > logits.shape[0]:
        raise ValueError(f"ensemble_sweep: subsets of k = {subsets.shape[1]} members from a pool of "
                         f"K = {logits.shape[0]}")
    if not (target.device == logits.device == subsets.device):
        raise ValueError("ensemble_sweep: `logits`, `target` and `subsets` must be on one device, got "
                         f"{logits.device}, {target.device}, {subsets.device}")
    if rule not in SWEEP_RULES:
        raise ValueError(f"ensemble_sweep: `rule` must be one of average, vote, median, geometric, got "
                         f"{rule!r}")
    pool = logits.shape[0]
    rows = subsets.cpu()
    for r, row in enumerate(rows.tolist()):
        for j, member in enumerate(row):
            if not 0 <= member < pool:
                raise ValueError(f"ensemble_sweep: `subsets` row {r} has member index {member} outside "
                                 f"[0, {pool})")
            if member in row[:j]:
                raise ValueError(f"ensemble_sweep: `subsets` row {r} repeats member {member}")


def sweep_keys(z: torch.Tensor, argmax: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranking keys ``(primary, secondary)`` ``(N, C)`` float64 of a subset's consensus, from its
    members' logits ``z`` ``(k, N, C)`` float64 (subset order) and argmaxes ``(k, N)``: the summed
    logits (average, geometric; summed in subset order), the median ((a + b) * 0.5 of the middle two
    for even k), or (votes, summed logits) for vote. Higher ranks first; equal keys: lower index."""
    total = z[0]
    for j in range(1, z.shape[0]):
        total = total + z[j]
    zero = torch.zeros_like(total)
    if rule in ("average", "geometric"):
        return total, zero
    if rule == "median":
        ordered = torch.sort(z, dim=0).values
        k = z.shape[0]
        middle = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) * 0.5
        return middle, zero
    votes = torch.zeros_like(total)
    votes.scatter_add_(1, argmax.T.contiguous(), torch.ones(argmax.T.shape, dtype=torch.float64,
                                                             device=z.device))
    return votes, total


def sweep_target_rank(primary: torch.Tensor, secondary: torch.Tensor, target: torch.Tensor,
                      cap: int = SWEEP_RANK_CAP) -> torch.Tensor:
    """Classes ranked above the target ``(N,)`` int64 (capped at ``cap``): a greater key, or an equal
    key and a lower class index."""
    pt = primary.gather(1, target[:, None])
    st = secondary.gather(1, target[:, None])
    greater = (primary > pt) | ((primary == pt) & (secondary > st))
    equal = (primary == pt) & (secondary == st)
    lower = torch.arange(primary.shape[1], device=primary.device)[None, :] < target[:, None]
    return (greater | (equal & lower)).sum(dim=1).clamp_max(cap)


def ensemble_sweep(logits: torch.Tensor, target: torch.Tensor, subsets: torch.Tensor,
                   rule: str = "average") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``divfast::ensemble_sweep``: brute force over every subset and every class; see
    :func:`divfast._ops.ensemble_sweep.ensemble_sweep`."""
    check_ensemble_sweep_args(logits, target, subsets, rule)
    pool, n, c = logits.shape
    if n and not torch.isfinite(logits).all():
        raise ValueError("ensemble_sweep: `logits` contain NaN or infinity")
    if n and (int(target.min()) < 0 or int(target.max()) >= c):
        raise ValueError(f"ensemble_sweep: `target` has a label outside [0, {c})")
    s, k = subsets.shape
    device = logits.device
    top1 = torch.zeros(s, dtype=torch.int64, device=device)
    top5 = torch.zeros(s, dtype=torch.int64, device=device)
    hist = torch.zeros(s, k + 1, dtype=torch.int64, device=device)
    if n == 0:
        return top1, top5, hist
    z = logits.to(torch.float64)
    argmax = logits.argmax(dim=2)  # (K, N): the first maximum, on the logits as given
    correct = (argmax == target[None, :]).to(torch.int64)
    for r, row in enumerate(subsets.tolist()):
        members = torch.tensor(row, device=device)
        hist[r] = torch.bincount(correct[members].sum(dim=0), minlength=k + 1)
        rank = sweep_target_rank(*sweep_keys(z[members], argmax[members], rule), target)
        top1[r] = (rank == 0).sum()
        top5[r] = (rank < SWEEP_RANK_CAP).sum()
    return top1, top5, hist
