"""Corruptions that grey out parts of the image: checkerboard cutout and lines.

Both follow the reference's algorithms and parameter distributions (``CheckerBoardCutOut`` and
``Lines`` in facebookresearch/augmentation-corruption) with these deliberate differences:

* checkerboard: the reference looks a cell up with ``grid[int(nx), int(ny)]``, truncating toward zero
  (so the cells either side of 0 share one draw) and wrapping negative indices to the far end of the
  grid (so cells on opposite sides share draws). We use ``floor`` for the cell and an offset grid,
  so every cell of the rotated checkerboard has its own Bernoulli draw. The parity rule, the cell
  size, the grey (128, 128, 128) and the expected grey area (severity / 20 of the image) are the
  reference's.
* lines: the reference truncates each line's end points to integers, rasterises with scikit-image's
  ``line_aa`` (Zingl's algorithm: the two pixels of each major-axis step nearest the line, with
  weight ``1 - perpendicular distance``), and blends each line into a uint8 image, truncating after
  every line. We rasterise the same weights from the exact (untruncated) segment and blend in float;
  since blending toward grey is ``out = 128 + (img - 128) * prod(1 - w)``, the line order does not
  matter and the whole image is one product.
"""

from __future__ import annotations

import math

import torch

from divfast.corruptions._common import TWO_PI, per_image, pixel_grid
from divfast.corruptions.registry import Corruption, register

GREY = 128.0


def _cells_per_side(height: int, width: int) -> int:
    """Half the side of the cell grid: enough cells of the smallest size to cover any rotation."""
    smallest = max(0.1 * min(height, width), 1.0)
    return math.ceil(math.hypot(height, width) / smallest) + 1


@register
class CheckerboardCutout(Corruption):
    """Greys every other cell of a randomly rotated checkerboard where a Bernoulli(severity/10) grid
    says so. Cell size U(0.1, 0.25) of the image size (at least 1 px), angle U(0, 2 pi)."""

    name = "checkerboard"
    reference = "checkerboard_cutout"
    aliases = ("checkerboard_cutout",)

    def sample(self, rng, height, width, severity):
        size = min(height, width)
        angle = rng.uniform(0.0, TWO_PI)
        scale = max(rng.uniform(0.1, 0.25) * size, 1.0)
        g = _cells_per_side(height, width)
        grid = rng.random((2 * g, 2 * g)) < severity / 10.0
        return {"angle": angle, "scale": scale, "grid": grid}

    def apply(self, images, params):
        b, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        cos_a, sin_a = per_image(torch.cos(params["angle"])), per_image(torch.sin(params["angle"]))
        scale = per_image(params["scale"])
        kx = torch.floor((cos_a * rows + sin_a * cols) / scale).long()  # (B, H, W) cell along the
        ky = torch.floor((cos_a * cols - sin_a * rows) / scale).long()  # rotated axes
        side = params["grid"].shape[-1]
        g = side // 2
        on = params["grid"].reshape(b, -1).gather(1, ((kx + g) * side + (ky + g)).reshape(b, -1))
        grey = (((kx + ky) & 1) == 0) & on.view(b, h, w)  # (B, H, W)
        return torch.where(grey.unsqueeze(1), images.new_tensor(GREY), images)


@register
class Lines(Corruption):
    """``int(severity / 10 * size)`` anti-aliased grey lines, each through a uniform random point,
    ``2 * size`` long, at ``angle + 2 pi * variation * (u - 0.5)`` with angle U(0, 2 pi) and
    variation U(0.1, 1) per image."""

    name = "lines"
    reference = "lines"

    def sample(self, rng, height, width, severity):
        size = min(height, width)
        count = int(severity / 10.0 * size)
        angle = rng.uniform(0.0, TWO_PI)
        variation = rng.uniform(0.1, 1.0)
        u = rng.random((count, 3))  # per line: row, col, angle jitter
        return {
            "row": u[:, 0] * height,
            "col": u[:, 1] * width,
            "angle": angle + TWO_PI * variation * (u[:, 2] - 0.5),
            "half_length": float(size),
        }

    def apply(self, images, params):
        b, _, h, w = images.shape
        if params["row"].shape[1] == 0:
            return images.clone()
        transmit = line_transmittance(params["row"], params["col"], params["angle"],
                                      params["half_length"], h, w)  # (B, H, W)
        return GREY + (images - GREY) * transmit.unsqueeze(1)


def line_transmittance(row: torch.Tensor, col: torch.Tensor, angle: torch.Tensor,
                       half_length: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``prod over lines of (1 - w)`` per pixel, ``w`` the Zingl anti-aliasing weight of each line.

    Lines ``(B, L)`` run through ``(row, col)`` with direction ``(cos angle, sin angle)`` in (row,
    col) and extend ``half_length`` either way. Per major-axis step a line covers the two pixels
    whose minor-axis distance to it is below one, each weighted by one minus its perpendicular
    distance. Computed in the log domain with one scatter-add: O(B * L * max(H, W)), not O(H * W)
    per line.
    """
    b, n_lines = row.shape
    device = row.device
    dr, dc = torch.cos(angle), torch.sin(angle)  # (B, L)
    row_major = dr.abs() >= dc.abs()
    major_cos = torch.maximum(dr.abs(), dc.abs())
    steps = torch.arange(max(height, width), device=device, dtype=torch.float32).view(1, 1, -1)
    m0 = torch.where(row_major, row, col).unsqueeze(-1)
    slope = torch.where(row_major, dc / dr, dr / dc).unsqueeze(-1)
    minor0 = torch.where(row_major, col, row).unsqueeze(-1)
    minor = minor0 + (steps - m0) * slope  # (B, L, S): the line's minor coordinate at each step
    base = torch.floor(minor)
    frac = minor - base
    n_major = torch.where(row_major, height, width).unsqueeze(-1)
    n_minor = torch.where(row_major, width, height).unsqueeze(-1)
    in_segment = ((steps - m0).abs() <= half_length.view(-1, 1, 1) * major_cos.unsqueeze(-1)) & (steps < n_major)
    log_keep = torch.zeros(b, height * width, device=device, dtype=torch.float32)
    for offset, dist in ((0, frac), (1, 1.0 - frac)):
        idx = base.long() + offset
        weight = (1.0 - dist * major_cos.unsqueeze(-1)).clamp_(0.0, 1.0)
        ok = in_segment & (idx >= 0) & (idx < n_minor) & (dist < 1.0)
        major_idx = steps.long().expand_as(idx)
        flat = torch.where(row_major.unsqueeze(-1), major_idx * width + idx, idx * width + major_idx)
        flat = torch.where(ok, flat, torch.zeros_like(flat))
        contrib = torch.where(ok, torch.log1p(-weight), torch.zeros_like(weight))
        log_keep.scatter_add_(1, flat.reshape(b, -1), contrib.reshape(b, -1))
    return torch.exp(log_keep).view(b, height, width)
