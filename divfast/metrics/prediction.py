"""``PredictionDiversity``: the streaming, mergeable form of :func:`divfast.functional.prediction_diversity`."""

from __future__ import annotations

import torch

from divfast.distributed import all_reduce_sum
from divfast.functional.prediction import (
    empty_prediction_stats,
    merge_prediction_stats,
    prediction_measures,
    prediction_stats,
)


class PredictionDiversity:
    """Accumulates prediction-diversity statistics over batches, shards and processes.

    The state is a dict of int64 counts and float64 sums (identity zero), so ``update`` adds,
    ``merge`` adds another instance's state, ``sync`` all-reduces once per dtype, and ``compute`` on
    the merged state equals the functional on all the data (counts exactly; float64 sums up to the
    order of additions).

    Args:
        num_members: M; optional, taken from the first ``update`` otherwise (``sync`` needs a state on
            every rank, so pass it for distributed evaluation).
        num_classes: C; checked against label inputs and bounding equitability's species count
            S = min(M, C). Taken from the logits' width when not given.
        device: where the state lives. Default: the device of the first batch (a state created by
            ``num_members`` before any batch moves there once).

    Example:
        >>> metric = PredictionDiversity(num_members=3)
        >>> for _ in range(4):
        ...     metric.update(torch.randn(3, 16, 10), torch.randint(0, 10, (16,)))
        >>> metric.compute()["n_samples"]
        64
    """

    def __init__(self, num_members: int | None = None, num_classes: int | None = None,
                 device: torch.device | str | None = None):
        if num_members is not None and num_members < 1:
            raise ValueError(f"`num_members` must be >= 1, got {num_members}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
        self.num_members = num_members
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else None
        self.state: dict[str, torch.Tensor] | None = None
        if num_members is not None:
            self.state = empty_prediction_stats(num_members, self.device)

    def update(self, predictions: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch: logits ``(M, B, C)`` or labels ``(M, B)``, target ``(B,)``."""
        if self.num_members is not None and predictions.shape[0] != self.num_members:
            raise ValueError(
                f"`predictions` has {predictions.shape[0]} members, this metric was built for "
                f"num_members={self.num_members}"
            )
        stats = prediction_stats(predictions, target, self.num_classes)
        if predictions.dim() == 3 and self.num_classes is None:
            self.num_classes = predictions.shape[2]
        if self.state is None:
            self.num_members = predictions.shape[0]
            self.state = stats
            return
        if self.device is None and self.state["counts"].device != predictions.device:
            # Follow the data: one move, then every later batch adds on its own device.
            self.state = {k: v.to(predictions.device) for k, v in self.state.items()}
        self.state = merge_prediction_stats(self.state, stats)

    def merge(self, other: "PredictionDiversity") -> "PredictionDiversity":
        """Adds ``other``'s state into this one (in place) and returns self."""
        if self.num_classes is None:
            self.num_classes = other.num_classes
        if other.state is None:
            return self
        if self.state is None:
            self.num_members = other.num_members
            self.state = {k: v.clone() for k, v in other.state.items()}
            return self
        if other.num_members != self.num_members:
            raise ValueError(
                f"cannot merge a {other.num_members}-member state into a {self.num_members}-member one"
            )
        self.state = merge_prediction_stats(self.state, other.state)
        return self

    def sync(self, group=None) -> "PredictionDiversity":
        """All-reduces the state over the processes of ``group`` (one collective per dtype)."""
        if self.state is None:
            raise RuntimeError(
                "PredictionDiversity.sync: no state; pass `num_members` so every rank has one"
            )
        self.state = all_reduce_sum(self.state, group)
        return self

    def compute(self) -> dict:
        """Every measure of :func:`divfast.functional.prediction_diversity` on the data seen."""
        if self.state is None:
            raise RuntimeError("PredictionDiversity.compute: no data; call update() first")
        return prediction_measures(self.state, self.num_classes)

    def reset(self) -> None:
        """Back to the identity, on the state's current device."""
        if self.state is None:
            return
        device = self.state["counts"].device
        self.state = empty_prediction_stats(self.num_members, device)

    def state_dict(self) -> dict:
        """Plain tensors, loadable with ``torch.load(weights_only=True)`` and mergeable later."""
        return {"num_members": self.num_members, "num_classes": self.num_classes,
                "state": None if self.state is None else {k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.num_members = sd["num_members"]
        self.num_classes = sd["num_classes"]
        self.state = None if sd["state"] is None else dict(sd["state"])
