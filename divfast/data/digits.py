"""The embedded default dataset: scikit-learn's handwritten digits, offline and real.

1,797 8x8 greyscale images of 10 digits (they ship inside scikit-learn), upsampled bilinearly to
3x32x32 so image models and corruptions apply unchanged. A fixed, stratified, seeded split gives 1,257
training and 540 test images, identical on every machine.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

IMAGE_SIZE = 32
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.3


@functools.lru_cache(maxsize=1)
def _images_and_labels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y))
    train_idx, _ = train_test_split(idx.numpy(), test_size=TEST_FRACTION, stratify=y.numpy(),
                                    random_state=SPLIT_SEED)
    is_train = torch.zeros(len(y), dtype=torch.bool)
    is_train[torch.as_tensor(train_idx)] = True
    return x, y, is_train


def digits_uint8(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` of the ``"train"`` or ``"test"`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    x, y, is_train = _images_and_labels()
    mask = is_train if split == "train" else ~is_train
    return x[mask], y[mask]


class DigitsDataset(TensorDataset):
    """Float images in [0, 1] ``(3, 32, 32)`` and int64 labels; ``classes`` names the digits."""

    classes = [str(d) for d in range(NUM_CLASSES)]


def digits_dataset(split: str) -> DigitsDataset:
    """The ``"train"`` or ``"test"`` split of the embedded digits."""
    x, y = digits_uint8(split)
    return DigitsDataset(x.float() / 255.0, y)
