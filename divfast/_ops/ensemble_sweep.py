"""``divfast::ensemble_sweep``: accuracy of the consensus of every subset of a member pool, in one pass."""

from __future__ import annotations

import torch

from divfast._ops import reference
from divfast._ops._load import use_kernel


def _ensemble_sweep_fake(logits, target, subsets, rule="average"):
    torch._check(subsets.dim() == 2, lambda: "subsets must be (S, k)")
    s, k = subsets.shape
    return (logits.new_empty((s,), dtype=torch.int64), logits.new_empty((s,), dtype=torch.int64),
            logits.new_empty((s, k + 1), dtype=torch.int64))


def register_fake_kernel() -> None:
    """Shape function; called once by _load after divfast._C (counts are not differentiable)."""
    torch.library.register_fake("divfast::ensemble_sweep")(_ensemble_sweep_fake)


def ensemble_sweep(logits: torch.Tensor, target: torch.Tensor, subsets: torch.Tensor,
                   rule: str = "average") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 correct counts of the consensus of every subset of a member pool, and each
    subset's histogram of correct members, from one pass over the pool's logits.

    Each subset's consensus ranks the classes of a sample by a key, higher first, and among exactly
    equal keys the lower class index first:

    - ``"average"`` and ``"geometric"``: the members' logits summed in float64 in subset order (the
      mean of the logits, the paper's averaging; the geometric mean of the softmax probabilities
      ranks classes identically, since ``log p_i(c) = z_i(c) - lse_i``);
    - ``"median"``: the per-class median in float64 (``(a + b) / 2`` of the middle two for even k);
    - ``"vote"``: the number of members whose argmax (first maximum) is the class; ties in votes go
      to the class with the higher summed logits, i.e. the one the averaging consensus prefers.

    A sample counts for top-1 when no class ranks above its target and for top-5 when fewer than
    five do. The histogram counts, per sample, how many of the subset's members are right on their
    own (their argmax is the target): the input of Kuncheva's non-pairwise measures of that subset.

    The compiled kernel reads each sample's K rows once, keeps every member's top five classes and a
    bound, and ranks the target among the union of a subset's lists; the bound proves that rank
    exact (or the target out of the top five) in nearly every case, and the rest scan all C classes.
    Results equal the brute-force reference exactly.

    Args:
        logits: ``(K, N, C)`` float16, bfloat16, float32 or float64: K members, N samples.
        target: ``(N,)`` int64 labels in ``[0, C)``.
        subsets: ``(S, k)`` int64: each row k distinct member indices in ``[0, K)``.
        rule: ``"average"``, ``"vote"``, ``"median"`` or ``"geometric"``.

    Returns:
        ``(top1 (S,), top5 (S,), histogram (S, k + 1))``, int64 counts.

    Raises:
        ValueError: bad shapes, rule or subsets (out of range, repeated members), labels outside
            ``[0, C)``, NaN or infinite logits.
        TypeError: wrong dtypes.

    Example:
        >>> import itertools
        >>> logits = torch.randn(4, 100, 10)
        >>> target = torch.randint(0, 10, (100,))
        >>> triples = torch.tensor(list(itertools.combinations(range(4), 3)))
        >>> top1, top5, hist = ensemble_sweep(logits, target, triples, "vote")
        >>> top1.shape, hist.shape, bool((hist.sum(dim=1) == 100).all())
        (torch.Size([4]), torch.Size([4, 4]), True)
    """
    if use_kernel("ensemble_sweep", logits.device):
        return torch.ops.divfast.ensemble_sweep(logits, target, subsets, rule)
    return reference.ensemble_sweep(logits, target, subsets, rule)
