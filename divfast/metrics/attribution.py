"""``AttributionDiversity``: the streaming, mergeable form of
:func:`divfast.functional.attribution_diversity`, with the diversity of any member subset."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divfast._ops.reference import ATTRIBUTION_NORMALIZATIONS
from divfast.distributed import all_reduce_sum
from divfast.functional.attribution import (
    attribution_measures,
    attribution_stats_state,
    pairwise_attribution_diversity,
    subset_diversity,
)


def _empty_state(m: int, device) -> dict[str, torch.Tensor]:
    return {"variance_sum": torch.zeros((), dtype=torch.float64, device=device),
            "gram": torch.zeros(m, m, dtype=torch.float64, device=device),
            "n_samples": torch.zeros((), dtype=torch.int64, device=device)}


class AttributionDiversity:
    """Accumulates attribution-diversity sums over batches, shards and processes.

    The state is float64 sums and an int64 count (identity zero): ``update`` adds a batch,
    ``merge`` adds another instance, ``sync`` all-reduces once per dtype, and ``compute`` equals
    the functional on all the data up to the order of float64 additions. With ``ddof=0`` the Gram
    gives any subset's diversity (:meth:`for_subset`) without new maps.

    Args:
        num_members: M; optional, taken from the first ``update`` (pass it for ``sync``).
        abs, normalize, ddof: as :func:`divfast.functional.attribution_diversity`.

    Example:
        >>> metric = AttributionDiversity(num_members=4)
        >>> for _ in range(3):
        ...     metric.update(torch.rand(4, 8, 3, 16, 16))
        >>> metric.compute()["n_samples"], metric.for_subset([0, 2]) > 0
        (24, True)
    """

    def __init__(self, num_members: int | None = None, abs: bool = True, normalize: str = "none",
                 ddof: int = 0):
        if num_members is not None and num_members < 1:
            raise ValueError(f"`num_members` must be >= 1, got {num_members}")
        if normalize not in ATTRIBUTION_NORMALIZATIONS:
            raise ValueError(f"`normalize` must be one of {', '.join(ATTRIBUTION_NORMALIZATIONS)}, "
                             f"got {normalize!r}")
        if ddof not in (0, 1):
            raise ValueError(f"`ddof` must be 0 or 1, got {ddof!r}")
        self.num_members = num_members
        self.abs, self.normalize, self.ddof = abs, normalize, ddof
        self.state = _empty_state(num_members, None) if num_members is not None else None

    def update(self, attributions: torch.Tensor) -> None:
        """Adds one batch of maps ``(M, B, C, H, W)``."""
        if self.num_members is not None and attributions.shape[0] != self.num_members:
            raise ValueError(f"`attributions` has {attributions.shape[0]} members, this metric was "
                             f"built for num_members={self.num_members}")
        stats = attribution_stats_state(attributions, self.abs, self.normalize, self.ddof)
        if self.state is None:
            self.num_members = attributions.shape[0]
            self.state = stats
            return
        if self.state["gram"].device != stats["gram"].device:
            self.state = {k: v.to(stats["gram"].device) for k, v in self.state.items()}
        self.state = {k: self.state[k] + stats[k] for k in self.state}

    def merge(self, other: "AttributionDiversity") -> "AttributionDiversity":
        """Adds ``other``'s state into this one (in place) and returns self."""
        if other.state is None:
            return self
        if self.state is None:
            self.num_members = other.num_members
            self.abs, self.normalize, self.ddof = other.abs, other.normalize, other.ddof
            self.state = {k: v.clone() for k, v in other.state.items()}
            return self
        if other.num_members != self.num_members:
            raise ValueError(f"cannot merge a {other.num_members}-member state into a "
                             f"{self.num_members}-member one")
        if (other.abs, other.normalize, other.ddof) != (self.abs, self.normalize, self.ddof):
            raise ValueError("cannot merge states taken with different abs/normalize/ddof")
        self.state = {k: self.state[k] + other.state[k].to(self.state[k].device) for k in self.state}
        return self

    def sync(self, group=None) -> "AttributionDiversity":
        """All-reduces the state over the processes of ``group`` (one collective per dtype)."""
        if self.state is None:
            raise RuntimeError("AttributionDiversity.sync: no state; pass `num_members` so every "
                               "rank has one")
        self.state = all_reduce_sum(self.state, group)
        return self

    def compute(self) -> dict:
        """``{"diversity", "n_samples", "ddof", "pairwise", "gram"}`` on the data seen."""
        if self.state is None:
            raise RuntimeError("AttributionDiversity.compute: no data; call update() first")
        return attribution_measures(self.state, self.ddof)

    def for_subset(self, members: Sequence[int]) -> float:
        """Eq. 7 of the sub-ensemble ``members`` (indices into the pool), from the pool's Gram.

        Only defined for ``ddof=0``: the Gram identity holds for the population variance.
        Precision: the Gram is of maps centred on the *pool's* mean, formed from float32 products
        for float32 maps, so the result's absolute error is about 1e-7 of the pool's spread (sum of
        squared deviations); for a subset whose members are far closer to each other than to the
        rest of the pool, compute it from the subset's own maps (or pass float64 maps).
        """
        if self.state is None:
            raise RuntimeError("AttributionDiversity.for_subset: no data; call update() first")
        if self.ddof != 0:
            raise ValueError("for_subset needs ddof=0 (the Gram identity is the population variance's)")
        return subset_diversity(self.state["gram"], int(self.state["n_samples"]), members)

    def pairwise(self) -> torch.Tensor:
        """``(M, M)`` float64 diversity of every member pair."""
        if self.state is None:
            raise RuntimeError("AttributionDiversity.pairwise: no data; call update() first")
        return pairwise_attribution_diversity(self.state["gram"], int(self.state["n_samples"]), self.ddof)

    def reset(self) -> None:
        """Back to the identity, on the state's current device."""
        if self.state is not None:
            self.state = _empty_state(self.num_members, self.state["gram"].device)

    def state_dict(self) -> dict:
        """Plain tensors and options, loadable with ``torch.load(weights_only=True)``."""
        return {"num_members": self.num_members, "abs": self.abs, "normalize": self.normalize,
                "ddof": self.ddof,
                "state": None if self.state is None else {k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.num_members = sd["num_members"]
        self.abs, self.normalize, self.ddof = sd["abs"], sd["normalize"], sd["ddof"]
        self.state = None if sd["state"] is None else dict(sd["state"])
