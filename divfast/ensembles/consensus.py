"""Ensemble consensus: how M members' logits ``(M, B, C)`` become one score and one prediction.

Four rules (:data:`CONSENSUS_RULES`), each with the scores a user looks at (:func:`consensus`) and
the ranking that picks the ensemble's class (:func:`consensus_predictions`, :func:`target_rank`):

    * ``average``: the mean of the members' logits (the paper's averaging).
    * ``geometric``: the geometric mean of the members' softmax probabilities, renormalised; the
      scores are probabilities (each row sums to 1).
    * ``median``: the per-class median of the members' logits; for an even M the mean
      ``(a + b) * 0.5`` of the two middle values.
    * ``vote``: the number of members whose argmax is each class (a member's argmax is
      ``torch.argmax`` of its logits: a tie inside one member goes to its lower class index).

Ranking (the tests enforce each):
    * Classes rank by a key, higher first; among exactly equal keys the LOWER class index ranks
      first. The prediction is the class ranked first; :func:`target_rank` counts the classes ranked
      above the target, so top-1 correct is ``rank == 0`` and top-5 correct is ``rank < 5``.
    * ``average`` and ``geometric`` rank by the SUM of the members' logits, not by the scores.
      Dividing by M does not change the order, and log_softmax differs from the logits by one
      constant per member and sample, so the geometric mean of probabilities ranks classes exactly
      as the summed logits do. The sum has no rounding from the division or from exp and log, so
      the two rules always predict the same class.
    * ``median`` ranks by the median.
    * ``vote`` ranks by (votes, summed logits): the most votes wins, and a tie in votes goes to the
      class with the highest summed logits (the class averaging prefers), then to the lowest index.
      Three members voting for three different classes pick the one the averaged ensemble ranks
      highest among them, not simply the lowest index.

Reproducibility: everything is float64 (float16, bfloat16 and float32 convert exactly), and every
sum over members runs in member order, ``((z_0 + z_1) + z_2) + ...``, so the keys, and with them
predictions and ranks, are the same bit for bit on any device and match the sweep kernel's
brute-force reference (which calls :func:`ranking_keys`).

Logits must be finite: mask a class by dropping its column, not with -inf. Magnitudes must stay
below ``float64 max / (4 M)`` (about 4.5e307 / M; only float64 input can get there) so that no
float64 sum overflows.
"""

from __future__ import annotations

import torch

from divfast.errors import DivfastError

CONSENSUS_RULES = ("average", "vote", "median", "geometric")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise DivfastError(f"logits: expected a tensor (M, B, C), got {type(logits).__name__}")
    if logits.dim() != 3:
        raise DivfastError(f"logits: expected a 3-D tensor (M, B, C) of M members' logits for B "
                           f"samples and C classes, got shape {list(logits.shape)}")
    m, _, c = logits.shape
    if m < 1:
        raise DivfastError(f"logits: expected at least one member (M >= 1), got shape "
                           f"{list(logits.shape)}")
    if c < 1:
        raise DivfastError(f"logits: expected at least one class (C >= 1), got shape "
                           f"{list(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise DivfastError(f"logits: expected float16, bfloat16, float32 or float64, got "
                           f"{logits.dtype}")
    if logits.numel() == 0:
        return
    for name, bad in (("NaN", torch.isnan(logits)), ("infinite", torch.isinf(logits))):
        members = bad.flatten(1).any(dim=1)  # (M,)
        if bool(members.any()):
            raise DivfastError(f"logits: member {int(members.nonzero()[0])} has {name} values; "
                               "consensus needs finite logits (drop a masked class's column)")
    limit = torch.finfo(torch.float64).max / (4 * m)
    largest = float(logits.abs().amax())
    if largest > limit:
        raise DivfastError(f"logits: magnitudes up to {largest:.3g} would overflow float64 sums "
                           f"over {m} members; the largest allowed is {limit:.3g}")


def _check_rule(rule: str) -> None:
    if not isinstance(rule, str) or rule not in CONSENSUS_RULES:
        raise DivfastError(f"rule: expected one of {', '.join(CONSENSUS_RULES)}, got {rule!r}")


def _member_sum(z: torch.Tensor) -> torch.Tensor:
    """Sum over members ``(M, B, C) -> (B, C)`` in member order, never a reduction tree, so the
    result is reproducible bit for bit."""
    acc = z[0].clone()
    for i in range(1, z.shape[0]):
        acc = acc + z[i]
    return acc


def _member_median(z: torch.Tensor) -> torch.Tensor:
    """Per-class median over members ``(M, B, C) -> (B, C)``; even M: (a + b) * 0.5 of the two
    middle values, a <= b."""
    m = z.shape[0]
    ordered = torch.sort(z, dim=0).values  # (M, B, C), ascending
    if m % 2:
        return ordered[m // 2].clone()
    return (ordered[m // 2 - 1] + ordered[m // 2]) * 0.5


def _votes(z: torch.Tensor) -> torch.Tensor:
    """Members whose argmax is each class, ``(M, B, C) -> (B, C)`` float64."""
    labels = torch.argmax(z, dim=-1)  # (M, B): the first maximum wins a tie
    votes = z.new_zeros(z.shape[1:])  # (B, C)
    return votes.scatter_add_(1, labels.T, torch.ones_like(labels.T, dtype=z.dtype))


def ranking_keys(logits: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The keys that rank classes under ``rule``: higher first, then the lower class index.

    Args:
        logits: ``(M, B, C)`` float16, bfloat16, float32 or float64 logits of M members.
        rule: one of :data:`CONSENSUS_RULES`.

    Returns:
        ``(primary, secondary)``: ``primary`` is ``(B, C)`` float64 (the summed logits for
        ``average`` and ``geometric``, the median for ``median``, the vote counts for ``vote``);
        ``secondary`` is the summed logits ``(B, C)`` float64 that break ties in votes for
        ``vote``, and ``None`` for the other rules.

    Raises:
        DivfastError: bad ``logits`` (not 3-D, M or C zero, not floating point, not finite) or an
            unknown ``rule``.

    Example:
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 3.0, 0.5]]])  # (M=2, B=1, C=3)
        >>> primary, secondary = ranking_keys(logits, "vote")
        >>> primary
        tensor([[1., 1., 0.]], dtype=torch.float64)
        >>> secondary
        tensor([[2.0000, 4.0000, 0.5000]], dtype=torch.float64)
    """
    _check_logits(logits)
    _check_rule(rule)
    z = logits.to(torch.float64)  # (M, B, C), exact
    if rule == "median":
        return _member_median(z), None
    summed = _member_sum(z)  # (B, C)
    if rule == "vote":
        return _votes(z), summed
    return summed, None


def consensus(logits: torch.Tensor, rule: str = "average") -> torch.Tensor:
    """The ensemble's scores ``(B, C)`` float64 under ``rule`` (see the module docstring).

    Args:
        logits: ``(M, B, C)`` float16, bfloat16, float32 or float64 logits of M members.
        rule: ``"average"`` (mean logits), ``"geometric"`` (geometric mean of the softmax
            probabilities, renormalised: rows sum to 1), ``"median"`` (per-class median logit) or
            ``"vote"`` (members whose argmax is each class).

    Returns:
        ``(B, C)`` float64 scores. Rank them with :func:`consensus_predictions`, not ``argmax``:
        the prediction breaks ties by the rule's keys, which the scores can blur (votes tie more
        often than summed logits; a mean can round two different sums together).

    Raises:
        DivfastError: bad ``logits`` or an unknown ``rule``.

    Example:
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 3.0, 0.5]]])  # (M=2, B=1, C=3)
        >>> consensus(logits, "average")
        tensor([[1.0000, 2.0000, 0.2500]], dtype=torch.float64)
        >>> probs = consensus(logits, "geometric")  # rows sum to 1
        >>> probs.argmax(dim=-1), round(float(probs.sum()), 12)
        (tensor([1]), 1.0)
    """
    _check_logits(logits)
    _check_rule(rule)
    z = logits.to(torch.float64)  # (M, B, C)
    m = z.shape[0]
    if rule == "average":
        return _member_sum(z) / m
    if rule == "geometric":
        mean_log_prob = _member_sum(torch.log_softmax(z, dim=-1)) / m  # (B, C)
        return torch.softmax(mean_log_prob, dim=-1)
    if rule == "median":
        return _member_median(z)
    return _votes(z)


def _first_ranked(primary: torch.Tensor, secondary: torch.Tensor | None) -> torch.Tensor:
    """The class ranked first ``(B,)``: the highest key, then the lowest index (explicitly, so it
    does not rest on how an argmax breaks ties)."""
    best = primary == primary.amax(dim=-1, keepdim=True)  # (B, C)
    if secondary is not None:
        masked = torch.where(best, secondary, torch.full_like(secondary, -torch.inf))
        best &= secondary == masked.amax(dim=-1, keepdim=True)
    index = torch.arange(primary.shape[-1], device=primary.device)
    return torch.where(best, index, primary.shape[-1]).amin(dim=-1)


def consensus_predictions(logits: torch.Tensor, rule: str = "average") -> torch.Tensor:
    """The ensemble's predicted class ``(B,)`` int64 under ``rule``.

    Keys, higher first, then the lower class index among exactly equal keys: the summed logits for
    ``average`` and ``geometric`` (the two always agree), the median for ``median``, and (votes,
    summed logits) for ``vote``: a tie in votes goes to the class with the highest summed logits.

    Args:
        logits: ``(M, B, C)`` float16, bfloat16, float32 or float64 logits of M members.
        rule: one of :data:`CONSENSUS_RULES`.

    Returns:
        ``(B,)`` int64 class indices.

    Raises:
        DivfastError: bad ``logits`` or an unknown ``rule``.

    Example:
        >>> logits = torch.tensor([[[5.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
        >>> consensus_predictions(logits, "vote")  # one vote each: class 0 has the highest sum
        tensor([0])
        >>> consensus_predictions(logits, "median")  # medians 0, 0, 0: the lowest index
        tensor([0])
    """
    return _first_ranked(*ranking_keys(logits, rule))


def check_target(target: torch.Tensor, n: int, c: int) -> None:
    """Raises a DivfastError naming ``target`` unless it is ``n`` integer labels in ``[0, c)``."""
    if not isinstance(target, torch.Tensor) or target.shape != (n,):
        shape = list(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise DivfastError(f"target: expected shape ({n},) (one label per sample), got {shape}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise DivfastError(f"target: expected an integer tensor of class labels, got "
                           f"{target.dtype}")
    bad = (target < 0) | (target >= c)
    if n and bool(bad.any()):
        raise DivfastError(f"target: expected labels in [0, {c}) (the logits' C), got "
                           f"{int(target[bad][0])}")


def target_rank(logits: torch.Tensor, target: torch.Tensor, rule: str = "average",
                cap: int = 5) -> torch.Tensor:
    """How many classes the ensemble ranks above each sample's target, capped at ``cap``.

    Class c ranks above t when key(c) > key(t), or key(c) == key(t) and c < t, with the keys of
    :func:`ranking_keys` (for ``vote``, compared as (votes, summed logits)). Top-1 correct is
    ``rank == 0``; top-k correct is ``rank < k`` for any k <= ``cap``.

    Args:
        logits: ``(M, B, C)`` float16, bfloat16, float32 or float64 logits of M members.
        target: ``(B,)`` integer class labels in ``[0, C)``.
        rule: one of :data:`CONSENSUS_RULES`.
        cap: an int >= 1; ranks above it are reported as ``cap``.

    Returns:
        ``(B,)`` int64 ranks in ``[0, cap]``.

    Raises:
        DivfastError: bad ``logits``, an unknown ``rule``, a ``target`` of the wrong shape, dtype or
            range, or a ``cap`` below 1.

    Example:
        >>> logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]]])  # (M=1, B=2, C=3)
        >>> target_rank(logits, torch.tensor([1, 2]), "average")  # sample 1: class 1 ties, is first
        tensor([1, 1])
    """
    primary, secondary = ranking_keys(logits, rule)
    b, c = primary.shape
    check_target(target, b, c)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise DivfastError(f"cap: expected an int >= 1, got {cap!r}")
    target = target.to(device=primary.device, dtype=torch.long)
    index = torch.arange(c, device=primary.device)
    ahead = (index < target[:, None]).expand(b, c)  # (B, C): wins an exact tie
    if secondary is not None:
        s_t = secondary.gather(1, target[:, None])  # (B, 1)
        ahead = (secondary > s_t) | ((secondary == s_t) & ahead)
    p_t = primary.gather(1, target[:, None])  # (B, 1)
    above = (primary > p_t) | ((primary == p_t) & ahead)  # (B, C)
    return above.sum(dim=-1).clamp_max(cap)
