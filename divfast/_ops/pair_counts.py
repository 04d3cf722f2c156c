"""``divfast::pair_counts``: contingency counts of every member pair, from logits or labels."""

from __future__ import annotations

import torch

from divfast._ops import reference
from divfast._ops._load import use_kernel


def _pair_counts_fake(predictions, target, num_classes=-1):
    torch._check(predictions.dim() in (2, 3), lambda: "predictions must be (M, B, C) or (M, B)")
    m, b = predictions.shape[0], predictions.shape[1]
    return (
        predictions.new_empty((m, m, 2, 2), dtype=torch.long),
        predictions.new_empty((m, m), dtype=torch.long),
        predictions.new_empty((m + 1,), dtype=torch.long),
        predictions.new_empty((m, b), dtype=torch.bool),
    )


def register_fake_kernel() -> None:
    """Shape function for torch.compile / meta tensors; called once by _load after divfast._C."""
    torch.library.register_fake("divfast::pair_counts")(_pair_counts_fake)


def pair_counts(
    predictions: torch.Tensor, target: torch.Tensor, num_classes: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts, for every ordered member pair, how often each is right or wrong, in one read.

    The argmax over classes is fused in, so logits are read once; ties resolve like ``torch.argmax``
    (the first maximum).

    Args:
        predictions: logits ``(M, B, C)`` (float16, bfloat16, float32, float64) or predicted labels
            ``(M, B)`` int64, for M members and B samples.
        target: true labels ``(B,)`` int64.
        num_classes: -1, or the class count; with labels it bounds the valid range ``[0, C)``.

    Returns:
        ``(counts, agreement, histogram, correct)``: counts ``(M, M, 2, 2)`` int64 whose flat last four
        are N11, N10, N01, N00 of the pair (i, k) (1 = correct, first index = member i);
        agreement ``(M, M)`` int64, the samples on which i and k predict the same label;
        histogram ``(M + 1,)`` int64, samples by number of correct members; correct ``(M, B)`` bool.

    Raises:
        ValueError: on shapes that disagree, NaN logits or labels outside the valid range.
        TypeError: on unsupported dtypes (logits not floating, labels or target not int64).

    On CUDA the input errors are detected on the device; reading that flag is the op's one host
    synchronisation (so the op cannot be captured in a CUDA graph).

    Example:
        >>> logits = torch.randn(3, 8, 10); target = torch.randint(0, 10, (8,))
        >>> counts, agree, hist, correct = pair_counts(logits, target)
        >>> counts.shape, hist.sum().item()
        (torch.Size([3, 3, 2, 2]), 8)
    """
    if use_kernel("pair_counts", predictions.device):
        return torch.ops.divfast.pair_counts(predictions, target, num_classes)
    return reference.pair_counts(predictions, target, num_classes)
