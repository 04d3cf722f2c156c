"""``RepresentationSimilarity``: minibatch CKA between every pair of G representations (members x
layers), as additive sums of per-batch unbiased HSIC terms."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divfast.distributed import all_reduce_sum
from divfast.errors import DivfastError
from divfast.functional.representation import (MIN_BATCH, cka_from_hsic, gram_matrices,
                                               hsic_matrix_from_grams)


class RepresentationSimilarity:
    """Accumulates the unbiased HSIC of every pair of G representations over batches, shards and
    processes; ``compute`` gives minibatch CKA (Nguyen, Raghu & Kornblith 2021), paper Eq. 6.

    The state is ``hsic`` (G, G) float64, the sum of the per-batch HSIC matrices, and ``batches``
    (int64), so ``update`` adds, ``merge`` adds and ``sync`` all-reduces once per dtype. Each batch
    needs at least 4 samples (the unbiased estimator divides by n (n - 3)); a smaller batch is
    skipped and counted in ``skipped`` (pass ``drop_last=True`` to the loader, or merge the tail
    into the previous batch, to use every sample).

    Args:
        names: optional labels of the G representations (e.g. ``"member0/layer1"``).
        kernel: ``"linear"`` or ``"rbf"``; ``bandwidth``: the RBF width as a fraction of the median
            distance (per batch).

    Example:
        >>> metric = RepresentationSimilarity()
        >>> x = torch.randn(64, 16)
        >>> for xb in x.split(16):
        ...     metric.update([xb, 2 * xb, torch.randn(16, 4)])
        >>> cka = metric.compute()["cka"]
        >>> round(cka[0][1], 6), cka[0][2] < 0.5
        (1.0, True)
    """

    def __init__(self, names: Sequence[str] | None = None, kernel: str = "linear", bandwidth: float = 0.5):
        if kernel not in ("linear", "rbf"):
            raise DivfastError(f"kernel: expected 'linear' or 'rbf', got {kernel!r}")
        self.names = list(names) if names is not None else None
        self.kernel, self.bandwidth = kernel, bandwidth
        self.state: dict[str, torch.Tensor] | None = None
        self.skipped = 0

    def update(self, features: Sequence[torch.Tensor]) -> None:
        """Adds one batch: G representations ``(n, ...)`` of the same n samples."""
        if self.names is not None and len(features) != len(self.names):
            raise DivfastError(f"features: expected {len(self.names)} representations (one per name), "
                               f"got {len(features)}")
        if features and features[0].shape[0] < MIN_BATCH:
            self.skipped += int(features[0].shape[0])
            return
        self.update_grams(gram_matrices(features, self.kernel, self.bandwidth))

    def update_grams(self, grams: torch.Tensor) -> None:
        """Adds one batch given as its Gram matrices ``(G, n, n)`` (e.g. from
        :class:`divfast.ensembles.features.GramCapture`, which forms them inside the forward pass);
        a batch of n < 4 samples is skipped and counted."""
        if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
            raise DivfastError(f"grams: expected (G, n, n), got {tuple(grams.shape)}")
        if self.names is not None and grams.shape[0] != len(self.names):
            raise DivfastError(f"grams: expected {len(self.names)} Gram matrices (one per name), "
                               f"got {grams.shape[0]}")
        if grams.shape[1] < MIN_BATCH:
            self.skipped += int(grams.shape[1])
            return
        hsic = hsic_matrix_from_grams(grams)
        stats = {"hsic": hsic, "batches": torch.ones((), dtype=torch.int64, device=hsic.device)}
        if self.state is None:
            self.state = stats
            return
        if self.state["hsic"].shape != hsic.shape:
            raise DivfastError(f"features: {hsic.shape[0]} representations, this metric holds "
                               f"{self.state['hsic'].shape[0]}")
        self.state = {k: self.state[k].to(stats[k].device) + stats[k] for k in stats}

    def merge(self, other: "RepresentationSimilarity") -> "RepresentationSimilarity":
        """Adds ``other``'s sums into this one (in place) and returns self."""
        self.skipped += other.skipped
        if other.state is None:
            return self
        if self.state is None:
            self.state = {k: v.clone() for k, v in other.state.items()}
            return self
        if other.state["hsic"].shape != self.state["hsic"].shape:
            raise ValueError("cannot merge states of different numbers of representations")
        self.state = {k: self.state[k] + other.state[k].to(self.state[k].device) for k in self.state}
        return self

    def sync(self, group=None) -> "RepresentationSimilarity":
        """All-reduces the sums over the processes of ``group`` (one collective per dtype)."""
        if self.state is None:
            raise RuntimeError("RepresentationSimilarity.sync: no state; every rank needs one batch")
        self.state = all_reduce_sum(self.state, group)
        return self

    def compute(self) -> dict:
        """``{"cka": G x G, "hsic": G x G mean per batch, "batches", "skipped_samples", "names"}``."""
        if self.state is None:
            raise RuntimeError("RepresentationSimilarity.compute: no batch of >= 4 samples seen")
        batches = int(self.state["batches"])
        return {"cka": cka_from_hsic(self.state["hsic"]).tolist(),
                "hsic": (self.state["hsic"] / batches).tolist(), "batches": batches,
                "skipped_samples": self.skipped, "names": self.names}

    def state_dict(self) -> dict:
        return {"names": self.names, "kernel": self.kernel, "bandwidth": self.bandwidth,
                "skipped": self.skipped,
                "state": None if self.state is None else {k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.names, self.kernel, self.bandwidth = sd["names"], sd["kernel"], sd["bandwidth"]
        self.skipped = sd["skipped"]
        self.state = None if sd["state"] is None else dict(sd["state"])
