"""A corrupted view of any image dataset, applied on the fly in the data loader.

Every image is keyed by its path relative to the dataset root when the dataset knows one (an
ImageFolder's ``samples``), else by its index, so its corruption depends on neither its batch, nor
the loader's worker count, nor which subset of the data is read. The DataLoader fetches a batch with
``__getitems__``, so a batch is corrupted in one batched call inside the worker.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from divfast.corruptions import check_seed, check_severity, corrupt, format_dataset_spec, get_corruption


def sample_keys(dataset: Dataset) -> list[int | str] | None:
    """Relative paths (``class/file.JPEG``) of an ImageFolder-like dataset, else None (use indices)."""
    samples = getattr(dataset, "samples", None)
    root = getattr(dataset, "root", None)
    if samples is None or root is None:
        return None
    return [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in samples]


class CorruptedDataset(Dataset):
    """``base`` with corruption ``name`` at ``severity``; items are ``(image, label)`` like ``base``.

    Args:
        base: a dataset of ``(image (3, H, W) uint8 or float in [0, 1], label, ...)``: the image
            comes first; everything after it passes through.
        name: a corruption name or alias (see :func:`divfast.corruptions.list_corruptions`).
        severity: float in [0, 10].
        seed: the user's seed; with each image's key it fixes the image's parameters.

    Example:
        >>> from divfast.data import digits_dataset
        >>> view = CorruptedDataset(digits_dataset("test"), "lines", 1.6, seed=0)
        >>> image, label = view[0]  # the same image in any batch, worker or process
    """

    def __init__(self, base: Dataset, name: str, severity: float, seed: int = 0):
        self.base = base
        self.name = get_corruption(name).name
        self.severity = check_severity(severity)
        self.seed = check_seed(seed)
        self.keys = sample_keys(base)
        self.spec = format_dataset_spec(self.name, self.severity)
        if hasattr(base, "classes"):
            self.classes = base.classes

    def __len__(self) -> int:
        return len(self.base)

    def key(self, index: int) -> int | str:
        return self.keys[index] if self.keys is not None else int(index)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        items = [self.base[i] for i in indices]
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}  # images of one shape and dtype corrupt as one batch
        for pos, item in enumerate(items):
            groups.setdefault((tuple(item[0].shape), item[0].dtype), []).append(pos)
        for positions in groups.values():
            batch = torch.stack([items[p][0] for p in positions])
            keys = [self.key(indices[p]) for p in positions]
            corrupted = corrupt(batch, self.name, self.severity, seed=self.seed, keys=keys)
            for p, image in zip(positions, corrupted):
                out[p] = (image, *items[p][1:])
        return out

    def __repr__(self) -> str:
        return f"CorruptedDataset({self.spec}, seed={self.seed}, base={type(self.base).__name__}, n={len(self)})"
