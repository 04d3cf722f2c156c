"""Prediction diversity: Kuncheva & Whitaker's ten measures and the probability-based ones.

Everything is a function of additive sums (:func:`prediction_stats`), finalised by
:func:`prediction_measures`; :func:`prediction_diversity` is the two applied to all the data at once.

Conventions (the tests enforce each):
    * "Correct" for a member means its top-1 label equals the target. The ensemble's prediction is the
      argmax of the members' mean logits (the paper's averaging) for logits, or the plurality vote of
      the labels (ties to the smallest label) for labels.
    * Pairwise measures are M x M matrices over ordered pairs; the ensemble value is their mean over
      the ordered pairs i != k (for the symmetric ones, the mean over the unordered pairs). A pair whose value is undefined (a zero denominator, such as Q when
      N11*N00 + N01*N10 = 0) is NaN and left out of the mean; the mean of no defined pair is NaN.
    * Non-pairwise measures follow Kuncheva & Whitaker (2003) with L = M members; those dividing by
      L - 1 or L - ceil(L/2) (entropy, kappa, generalized diversity, coincident failure) are NaN for a
      single member, and every measure is NaN on zero samples.
    * ``kl`` is the mean over samples and ordered pairs i != k of KL(p_i || p_k) in nats, ``cosine`` the
      mean cosine *similarity* of the members' softmax vectors; both need logits (NaN for labels),
      and +inf logits or an all -inf row, where softmax is undefined, are an error.
    * Shannon equitability (paper Eq. 5) is computed per sample over the M members' predicted labels:
      each distinct predicted label is a species, p_s the share of members predicting it,
      E = -sum_s p_s ln p_s / ln S with S = min(M, C), the largest number of species M members can
      produce over C classes (C is the logits' width, ``num_classes``, or M when neither is known;
      for C >= M, the usual case, S = M either way). The state sums the entropies in nats, so it
      stays additive; the division by ln S happens in :func:`prediction_measures`.
      E is 0 when all members agree and 1 when all differ; the log base cancels. It is averaged over
      the samples the ensemble classifies correctly (``equitability_correct``) and incorrectly
      (``equitability_incorrect``), each NaN when it has no samples; NaN for S = 1.
"""

from __future__ import annotations

import math

import torch

from divfast._ops.pair_counts import pair_counts

PAIRWISE = ("disagreement", "q_statistic", "correlation", "double_fault", "label_disagreement",
            "kl", "cosine")
NON_PAIRWISE = ("entropy", "kohavi_wolpert", "kappa", "difficulty", "generalized_diversity",
                "coincident_failure")
MEASURES = PAIRWISE[:4] + NON_PAIRWISE + PAIRWISE[4:] + ("equitability_correct",
                                                         "equitability_incorrect")


def _check_inputs(predictions: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(predictions, torch.Tensor) or predictions.dim() not in (2, 3):
        shape = list(predictions.shape) if isinstance(predictions, torch.Tensor) else type(predictions)
        raise ValueError(
            f"`predictions` must be logits (M, N, C) or labels (M, N), got {shape}"
        )
    if not isinstance(target, torch.Tensor) or target.dim() != 1:
        raise ValueError(f"`target` must be a 1-D tensor of N labels, got {getattr(target, 'shape', target)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"`target` must hold integer class labels, got {target.dtype}")
    if target.shape[0] != predictions.shape[1]:
        raise ValueError(
            f"`target` has {target.shape[0]} samples but `predictions` has N = {predictions.shape[1]} "
            f"(shape {list(predictions.shape)})"
        )


def undefined_softmax_members(logits: torch.Tensor) -> torch.Tensor:
    """(M,) bool: members whose logits ``(M, B, C)`` hold NaN or +inf, or a row of all -inf; their
    softmax is undefined. (-inf entries alone are masked classes and fine.)"""
    flat = logits.flatten(1)
    bad = torch.isnan(flat).any(dim=1) | torch.isposinf(flat).any(dim=1)
    return bad | torch.isneginf(logits).all(dim=-1).any(dim=1)


def _check_softmax_defined(logits: torch.Tensor) -> None:
    """KL and cosine need softmax of every member's logits."""
    bad = undefined_softmax_members(logits)
    if bool(bad.any()):
        raise ValueError(f"`predictions`: member {int(bad.nonzero()[0])} has NaN or +inf logits or "
                         "a row of all -inf, where softmax (for kl and cosine) is undefined")


def _ensemble_labels(labels: torch.Tensor, logits: torch.Tensor | None,
                     same: torch.Tensor) -> torch.Tensor:
    """The ensemble's prediction (B,): mean-logit argmax, or the plurality vote of labels."""
    if logits is not None:  # average in at least float32, float64 stays float64
        wide = torch.promote_types(logits.dtype, torch.float32)
        return logits.to(wide).mean(dim=0).argmax(dim=-1)
    votes = same.sum(dim=1)  # (M, B): members sharing member m's label
    uniq, rank = torch.unique(labels, return_inverse=True)  # rank: label order, small ints
    key = votes * (len(uniq) + 1) - rank  # most votes first, then the smallest label; no overflow
    winner = key.argmax(dim=0)  # (B,)
    return labels.gather(0, winner[None]).squeeze(0)


def _probability_sums(logits: torch.Tensor, chunk_bytes: int = 1 << 28
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over samples of KL(p_i || p_k) and cos(p_i, p_k), each (M, M) float64.

    Float64 throughout, in chunks of samples so memory stays bounded (``chunk_bytes`` per float64
    copy) whatever N is: sum_b KL_b(i, k) = sum_b,c p_i log p_i - sum_b,c p_i log p_k, two GEMMs.
    """
    m, b, c = logits.shape
    kl = logits.new_zeros((m, m), dtype=torch.float64)
    cosine = logits.new_zeros((m, m), dtype=torch.float64)
    step = max(1, chunk_bytes // (8 * m * c))
    for start in range(0, b, step):
        logp = torch.log_softmax(logits[:, start:start + step].to(torch.float64), dim=-1)
        p = logp.exp()
        logp = logp.clamp_min(torch.finfo(torch.float64).min)  # 0 * -inf would be NaN
        flat_p = p.reshape(m, -1)
        cross = flat_p @ logp.reshape(m, -1).T  # (M, M): sum_b,c p_i log p_k
        kl += cross.diagonal()[:, None] - cross
        unit = torch.nn.functional.normalize(p, dim=-1).reshape(m, -1)
        cosine += unit @ unit.T
    return kl, cosine


def prediction_stats(predictions: torch.Tensor, target: torch.Tensor,
                     num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Additive sufficient statistics of one batch (identity: zeros; merge: ``+``).

    Args:
        predictions: member logits ``(M, B, C)`` or predicted labels ``(M, B)`` int64.
        target: true labels ``(B,)``, an integer dtype.
        num_classes: class count (checked against labels; defaults to C for logits).

    Returns:
        dict of int64 counts and float64 sums; see :func:`prediction_measures`.
    """
    _check_inputs(predictions, target)
    target = target.to(torch.long)
    m, b = predictions.shape[:2]
    is_logits = predictions.dim() == 3
    n_classes = predictions.shape[2] if is_logits else (num_classes or -1)
    if is_logits and num_classes not in (None, predictions.shape[2]):
        raise ValueError(
            f"`num_classes` ({num_classes}) disagrees with the logits' C = {predictions.shape[2]}"
        )
    counts, agreement, histogram, _ = pair_counts(predictions, target, n_classes)
    dev = predictions.device
    labels = predictions.argmax(dim=-1) if is_logits else predictions
    same = labels[:, None, :] == labels[None, :, :]  # (M, M, B)
    ens_correct = _ensemble_labels(labels, predictions if is_logits else None, same) == target

    votes = same.sum(dim=1).to(torch.float64)  # (M, B)
    entropy = -(torch.log(votes / m)).sum(dim=0) / m  # (B,) Shannon entropy in nats

    if is_logits and b:
        _check_softmax_defined(predictions)
        kl, cosine = _probability_sums(predictions)
    else:
        kl = cosine = torch.zeros((m, m), dtype=torch.float64, device=dev)
    return {
        "counts": counts,
        "agreement": agreement,
        "histogram": histogram,
        "ensemble_correct": ens_correct.sum().to(torch.long),
        "kl_sum": kl,
        "cosine_sum": cosine,
        "prob_samples": torch.tensor(b if is_logits else 0, dtype=torch.long, device=dev),
        "entropy_correct_sum": entropy[ens_correct].sum(dtype=torch.float64),
        "entropy_incorrect_sum": entropy[~ens_correct].sum(dtype=torch.float64),
    }


def empty_prediction_stats(num_members: int, device=None) -> dict[str, torch.Tensor]:
    """The identity of the merge: zero counts for ``num_members`` members."""
    m = num_members
    z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=device)  # noqa: E731
    return {
        "counts": z(m, m, 2, 2), "agreement": z(m, m), "histogram": z(m + 1),
        "ensemble_correct": z(), "kl_sum": z(m, m, dt=torch.float64),
        "cosine_sum": z(m, m, dt=torch.float64), "prob_samples": z(),
        "entropy_correct_sum": z(dt=torch.float64),
        "entropy_incorrect_sum": z(dt=torch.float64),
    }


def merge_prediction_stats(a: dict, b: dict) -> dict:
    """``a + b``: every state is a sum with identity zero."""
    if a.keys() != b.keys():
        raise ValueError("cannot merge prediction statistics with different keys")
    return {k: a[k] + b[k].to(a[k].device) for k in a}


def _nanmean_offdiag(mat: torch.Tensor) -> float:
    """Mean over ordered pairs i != k, NaN pairs excluded (for symmetric measures this is the mean
    over the unordered pairs i < k)."""
    m = mat.shape[0]
    vals = mat[~torch.eye(m, dtype=torch.bool, device=mat.device)]
    vals = vals[~torch.isnan(vals)]
    return float(vals.mean()) if vals.numel() else math.nan


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN where den == 0 (never inf)."""
    out = num / den
    return torch.where(den == 0, torch.full_like(out, math.nan), out)


def species_count(num_members: int, num_classes: int | None) -> int:
    """S of Eq. 5: the most species M members can produce over C classes, min(M, C) (M if C is
    unknown)."""
    return min(num_members, num_classes) if num_classes and num_classes > 0 else num_members


def prediction_measures(stats: dict[str, torch.Tensor], num_classes: int | None = None) -> dict:
    """Finalises :func:`prediction_stats` into every measure (see the module docstring).

    ``num_classes`` (C) only bounds equitability's species count S = min(M, C).
    """
    counts = stats["counts"].to(torch.float64).cpu()  # (M, M, 2, 2)
    m = counts.shape[0]
    n11, n10 = counts[..., 0, 0], counts[..., 0, 1]
    n01, n00 = counts[..., 1, 0], counts[..., 1, 1]
    hist = stats["histogram"].to(torch.float64).cpu()
    n = float(hist.sum())
    nt = torch.tensor(n, dtype=torch.float64)
    pair = {
        "disagreement": _div(n01 + n10, nt.expand_as(n11)),
        "q_statistic": _div(n11 * n00 - n01 * n10, n11 * n00 + n01 * n10),
        "correlation": _div(n11 * n00 - n01 * n10,
                            ((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)).sqrt()),
        "double_fault": _div(n00, nt.expand_as(n00)),
        "label_disagreement": _div(nt - stats["agreement"].to(torch.float64).cpu(),
                                   nt.expand_as(n00)),
    }
    n_prob = float(stats["prob_samples"])
    nan_mm = torch.full((m, m), math.nan, dtype=torch.float64)
    if n_prob > 0:
        pair["kl"] = stats["kl_sum"].cpu() / n_prob
        pair["cosine"] = stats["cosine_sum"].cpu() / n_prob
    else:
        pair["kl"], pair["cosine"] = nan_mm.clone(), nan_mm.clone()

    out: dict = {"n_samples": int(n), "n_members": m}
    for name in PAIRWISE:
        out[name] = _nanmean_offdiag(pair[name])
    out.update(non_pairwise_measures(hist, m, n))
    n_ens = float(stats["ensemble_correct"])
    out["member_accuracy"] = [float(x) for x in (n11.diagonal() / n)] if n else [math.nan] * m
    out["ensemble_accuracy"] = n_ens / n if n else math.nan
    species = species_count(m, num_classes)
    log_s = math.log(species) if species > 1 else 0.0
    out["equitability_correct"] = (
        math.nan if not log_s or n_ens == 0
        else float(stats["entropy_correct_sum"]) / n_ens / log_s)
    out["equitability_incorrect"] = (
        math.nan if not log_s or n - n_ens == 0
        else float(stats["entropy_incorrect_sum"]) / (n - n_ens) / log_s)
    out["pairwise"] = pair
    return out


def non_pairwise_measures(hist: torch.Tensor, m: int, n: float) -> dict[str, float]:
    """Kuncheva & Whitaker's non-pairwise measures of an ensemble from its histogram of
    correct-member counts.

    The histogram is all these measures need, so any sub-ensemble's values follow from its own
    histogram (:func:`divfast._ops.ensemble_sweep.ensemble_sweep` returns one per subset).

    Args:
        hist: ``(m + 1,)`` counts (any real dtype): ``hist[j]`` samples on which exactly j of the
            m members are right.
        m: the number of members L (>= 1).
        n: the number of samples, ``hist.sum()``.

    Returns:
        ``{"entropy", "kohavi_wolpert", "kappa", "difficulty", "generalized_diversity",
        "coincident_failure"}`` as floats; NaN where undefined (see the module docstring).
    """
    hist = hist.to(torch.float64).cpu()
    nan = math.nan
    if n == 0:
        return {k: nan for k in NON_PAIRWISE}
    j = torch.arange(m + 1, dtype=torch.float64)  # number of correct members
    share = hist / n
    spread = (share * j * (m - j)).sum()  # mean of l(z)(L - l(z))
    out = {"kohavi_wolpert": float(spread / m**2)}
    x = j / m
    out["difficulty"] = float((share * x * x).sum() - (share * x).sum() ** 2)
    if m == 1:
        out.update(entropy=nan, kappa=nan, generalized_diversity=nan, coincident_failure=nan)
        return out
    out["entropy"] = float((share * torch.minimum(j, m - j)).sum() / (m - math.ceil(m / 2)))
    p_bar = float((share * j).sum() / m)
    den = (m - 1) * p_bar * (1 - p_bar)
    out["kappa"] = 1.0 - float(spread) / m / den if den > 0 else nan
    fail = torch.flip(share, dims=[0])  # fail[i] = share of samples where exactly i members fail
    i = j
    p1 = float((i / m * fail).sum())
    p2 = float((i * (i - 1) / (m * (m - 1)) * fail).sum())
    out["generalized_diversity"] = 1.0 - p2 / p1 if p1 > 0 else nan
    p0 = float(fail[0])
    if p0 >= 1.0:
        out["coincident_failure"] = 0.0
    else:
        out["coincident_failure"] = float(((m - i[1:]) / (m - 1) * fail[1:]).sum() / (1 - p0))
    return out


_non_pairwise = non_pairwise_measures  # the former private name, kept for callers


def prediction_diversity(predictions: torch.Tensor, target: torch.Tensor,
                         num_classes: int | None = None) -> dict:
    """Every prediction-diversity measure of an ensemble, over all the given samples.

    Args:
        predictions: member logits ``(M, N, C)`` or predicted labels ``(M, N)`` int64.
        target: true labels ``(N,)``.
        num_classes: class count, to check labels and to bound equitability's species.

    Returns:
        dict with the ensemble-level floats ``disagreement, q_statistic, correlation, double_fault,
        entropy, kohavi_wolpert, kappa, difficulty, generalized_diversity, coincident_failure,
        label_disagreement, kl, cosine, equitability_correct, equitability_incorrect``, plus
        ``member_accuracy`` (list), ``ensemble_accuracy``, ``n_samples``, ``n_members`` and
        ``pairwise`` (M x M float64 matrices of the pairwise measures).

    Example:
        >>> logits = torch.randn(3, 100, 10); target = torch.randint(0, 10, (100,))
        >>> d = prediction_diversity(logits, target)
        >>> 0.0 <= d["disagreement"] <= 1.0
        True
    """
    stats = prediction_stats(predictions, target, num_classes)
    width = predictions.shape[2] if predictions.dim() == 3 else num_classes
    return prediction_measures(stats, width)
