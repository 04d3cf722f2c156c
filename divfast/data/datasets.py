"""Datasets by spec: ``"clean"`` or a corruption at a severity (``"lines1.6"``, ``"plasma4.0"``, ...)
over the embedded digits or an ImageFolder.

A dataset yields float images in [0, 1] ``(3, H, W)`` and int64 labels; each member normalises its own
input (the checkpoint records the mean and std), so one pass of the data serves every member.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from divfast.corruptions import parse_dataset_spec
from divfast.data.digits import digits_dataset
from divfast.errors import DivfastError


def build_train_datasets(data: str | None = None, val_data: str | None = None,
                         image_size: int = 224) -> tuple[Dataset, Dataset]:
    """(train, validation) sets: the embedded digits' splits, or ImageFolders at ``data`` and
    ``val_data`` (default: ``data`` itself), which must share their class folders."""
    if data is None:
        if val_data is not None:
            raise DivfastError("--val-data needs --data (the embedded digits have their own test "
                               "split)")
        return digits_dataset("train"), digits_dataset("test")
    if image_size < 8:
        raise DivfastError(f"--image-size: expected >= 8, got {image_size}")
    train_set = build_dataset("clean", data=data, image_size=image_size)
    val_set = build_dataset("clean", data=val_data or data, image_size=image_size)
    if val_set.classes != train_set.classes:
        raise DivfastError("--val-data: its class folders differ from those of --data")
    return train_set, val_set


def build_dataset(spec: str = "clean", data: str | None = None, split: str = "test",
                  image_size: int | None = None, seed: int = 0) -> Dataset:
    """The dataset named by ``spec`` over the embedded digits, or over an ImageFolder at ``data``.

    Args:
        spec: ``"clean"`` or ``<corruption><severity>`` such as ``"lines1.6"`` (applied on the fly,
            each image seeded by its index, or its relative path in an ImageFolder).
        data: optional ImageFolder root (class sub-folders); default: the embedded digits.
        split: ``"train"`` or ``"test"`` of the embedded digits (ignored for an ImageFolder).
        image_size: crop size for an ImageFolder (Resize(size * 256 / 224), CenterCrop(size)).
        seed: the corruption seed (with each image's key it fixes the image's parameters).
    """
    name, severity = parse_dataset_spec(spec)
    base = _base_dataset(data, split, image_size)
    if name == "clean":
        return base
    from divfast.data.corrupted import CorruptedDataset

    return CorruptedDataset(base, name, severity, seed=seed)


def _base_dataset(data: str | None, split: str, image_size: int | None) -> Dataset:
    if data is None:
        return digits_dataset(split)
    if not os.path.isdir(data):
        raise DivfastError(f"--data: {data!r} is not a directory (expected an ImageFolder root)")
    from torchvision import datasets, transforms

    size = image_size or 224
    tf = transforms.Compose([
        transforms.Resize(int(round(size * 256 / 224))),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ])
    try:
        return datasets.ImageFolder(data, transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DivfastError(f"--data: {data!r} is not a usable ImageFolder: {exc}") from exc
