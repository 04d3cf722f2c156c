"""Pixel grids, bilinear sampling and blurring shared by the corruption families.

Coordinates follow the reference: a pixel is addressed ``(row, col)`` at integer positions, so pixel
``(0, 0)`` sits at the origin and ``(H - 1, W - 1)`` at the far corner.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixel_grid(height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row coordinates ``(1, H, 1)`` and column coordinates ``(1, 1, W)``, float32."""
    rows = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1)
    cols = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width)
    return rows, cols


def per_image(value: torch.Tensor) -> torch.Tensor:
    """A per-image parameter ``(B,)`` shaped ``(B, 1, 1)`` to broadcast over ``(B, H, W)``."""
    return value.view(-1, 1, 1)


def bilinear_sample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Samples ``images`` (B, C, H, W) at fractional pixel positions ``rows``/``cols`` (B, H', W').

    Like the reference's ``bilinear_interpolation``: each of the four neighbours outside the image
    counts as black, so content fades to black across the border instead of being clamped.
    """
    _, _, h, w = images.shape
    gx = cols * (2.0 / (w - 1)) - 1.0  # grid_sample wants (x=col, y=row) in [-1, 1]
    gy = rows * (2.0 / (h - 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)  # (B, H', W', 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _symmetric_pad_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices that pad a length-``n`` axis by ``radius`` with half-sample symmetry (d c b a | a b c d),
    SciPy's ``mode='reflect'``; folding repeats for axes shorter than the radius."""
    idx = torch.arange(-radius, n + radius, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def exact_matmul_dtype(device) -> torch.dtype:
    """float32, unless float32 matrix products may run in reduced precision (TF32 or bfloat16, set
    with ``torch.set_float32_matmul_precision``, ``allow_tf32`` or the ``fp32_precision`` flags),
    which would visibly change the corruptions computed as matrix products: then float64."""
    try:
        reduced = torch.get_float32_matmul_precision() != "highest"
        if torch.device(device).type == "cuda":
            reduced = reduced or torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the fp32_precision API is in use; the legacy getters refuse to answer
        reduced = True
    return torch.float64 if reduced else torch.float32


def _blur_matrix(n: int, weights: torch.Tensor, device) -> torch.Tensor:
    """(n, n) matrix applying the 1-D filter ``weights`` with half-sample symmetric borders."""
    radius = (weights.numel() - 1) // 2
    src = _symmetric_pad_index(n, radius, device)  # padded position -> source index
    rows = torch.arange(n, device=device).repeat_interleave(weights.numel())
    taps = torch.arange(weights.numel(), device=device).repeat(n)
    matrix = torch.zeros(n, n, device=device, dtype=weights.dtype)
    matrix.index_put_((rows, src[rows + taps]), weights[taps], accumulate=True)
    return matrix


def gaussian_blur(field: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's ``gaussian_filter(field, sigma)`` over the last two dims of ``field`` (B, H, W):
    a separable kernel of radius ``int(truncate * sigma + 0.5)``, borders mirrored half-sample.

    Each axis is one banded matrix product (``M_H @ field @ M_W^T``), the borders folded into the
    matrices: faster on CPUs than a convolution with a 9-tap kernel, and exact.
    """
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, device=field.device, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = (weights / weights.sum()).to(field.dtype)
    _, h, w = field.shape
    dtype = torch.promote_types(field.dtype, exact_matmul_dtype(field.device))
    weights = weights.to(dtype)
    out = _blur_matrix(h, weights, field.device) @ field.to(dtype) @ _blur_matrix(w, weights, field.device).T
    return out.to(field.dtype)


TWO_PI = 2.0 * math.pi
