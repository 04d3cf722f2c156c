"""Star-shaped bursts of white: sparkles (five bright stars) and inverse sparkles (a white frame with a
star-shaped window), following ``Sparkles`` and ``InverseSparkles`` in
facebookresearch/augmentation-corruption.

A star has ``rays`` ray lengths around its centre; a pixel at distance ``d`` and angle ``theta``
interpolates the length ``L`` of its two neighbouring rays (fraction ``f`` between them) and gets the
weight ``clip((1 - (f - 0.5)^2) * (L^2 / (d^2 + 1e-4))^e, 0, 1)``. Sparkles blend each star toward
white in turn, ``v + w (255 - v)``, which for five stars is ``255 - (255 - img) * prod(1 - w)``: one
product, in any order. As in the reference, a star of radius 0 (sparkles at severity 0) skips the
length term, so its weight is the fraction ``f`` itself and the image still brightens.
"""

from __future__ import annotations

import math

import torch

from divfast.corruptions._common import pixel_grid
from divfast.corruptions.registry import Corruption, register

WHITE = 255.0
MAX_RAYS = 199  # rays per star: U{50, ..., 199}
RANDOMNESS = 0.25


def star_weight(rows, cols, center_row, center_col, ray_lengths, rays, radius, exponent=None):
    """Weights (B, H, W) of one star per image: centre (B,), ray lengths (B, MAX_RAYS) of which the
    first ``rays`` (B,) are used, ``radius`` (B,) (0 disables the length term), ``exponent`` (B,)
    of the length term (None: 1)."""
    b = center_row.shape[0]
    dr = rows - center_row.view(-1, 1, 1)  # (B, H, 1)
    dc = cols - center_col.view(-1, 1, 1)  # (B, 1, W)
    dist2 = dr * dr + dc * dc  # (B, H, W)
    n = rays.view(-1, 1)
    d = (torch.atan2(dc, dr) + math.pi) * (n.view(-1, 1, 1).to(dist2.dtype) / (2.0 * math.pi))
    i = torch.floor(d)
    f = d - i
    # Ray k's length and the step to ray k + 1 (indices wrap at each image's ray count), packed as
    # one 64-bit word per ray so one gather fetches both.
    ext = ray_lengths.float().gather(1, torch.remainder(torch.arange(MAX_RAYS + 2, device=n.device), n))
    table = torch.stack((ext[:, :-1], ext[:, 1:] - ext[:, :-1]), dim=-1).contiguous()  # (B, R+1, 2)
    idx = i.long().clamp_(0, MAX_RAYS).view(b, -1)  # d in [0, rays]: the angle +pi maps to rays
    pair = table.view(torch.int64).view(b, -1).gather(1, idx).view(torch.float32).view(*f.shape, 2)
    length = pair[..., 0] + f * pair[..., 1]
    g = length * length / (dist2 + 1e-4)
    if exponent is not None:
        g = torch.pow(g, exponent.view(-1, 1, 1))
    weighted = (1.0 - (f - 0.5) ** 2) * g
    return torch.where(radius.view(-1, 1, 1) != 0, weighted, f).clamp_(0.0, 1.0)


@register
class Sparkles(Corruption):
    """Five white stars at uniform random centres, radius ``0.1 * size * severity / 10``, 50-199 rays
    each with length ``max(1, radius * (1 + 0.25 * N(0, 1)))``."""

    name = "sparkles"
    reference = "sparkles"
    stars = 5

    def sample(self, rng, height, width, severity):
        radius = 0.1 * severity / 10.0 * min(height, width)
        return {
            "center_row": rng.uniform(0.0, height, size=self.stars),
            "center_col": rng.uniform(0.0, width, size=self.stars),
            "rays": rng.integers(50, MAX_RAYS + 1, size=self.stars),
            "ray_lengths": (radius * (1.0 + RANDOMNESS * rng.normal((self.stars, MAX_RAYS)))).clip(min=1.0),
            "radius": radius,
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        keep = None
        for k in range(self.stars):  # the length term's exponent is 1: amount 50, (100 - 50) / 50
            weight = star_weight(rows, cols, params["center_row"][:, k], params["center_col"][:, k],
                                 params["ray_lengths"][:, k], params["rays"][:, k], params["radius"])
            keep = 1.0 - weight if keep is None else keep * (1.0 - weight)
        return WHITE - (WHITE - images) * keep.unsqueeze(1)


@register
class InverseSparkles(Corruption):
    """White everywhere except a star-shaped window around a centre U(0.25, 0.75) of each axis, radius
    ``size / 4``, 50-199 rays of length ``radius * (1 + 0.25 * N(0, 1))``; the window's edge sharpens
    with the exponent ``0.13 * severity`` (the reference's ``(100 - amount) / 50``, amount
    ``100 - 6.5 * severity``), so severity 0 still whitens up to a quarter of each pixel."""

    name = "inverse_sparkles"
    reference = "inverse_sparkles"

    def sample(self, rng, height, width, severity):
        radius = 0.25 * min(height, width)
        return {
            "center_row": rng.uniform(0.25, 0.75) * height,
            "center_col": rng.uniform(0.25, 0.75) * width,
            "rays": rng.integers(50, MAX_RAYS + 1),
            "ray_lengths": radius * (1.0 + RANDOMNESS * rng.normal(MAX_RAYS)),
            "radius": radius,
            "exponent": 65.0 * severity / 10.0 / 50.0,
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        weight = star_weight(rows, cols, params["center_row"], params["center_col"], params["ray_lengths"],
                             params["rays"], params["radius"], params["exponent"])
        return WHITE + weight.unsqueeze(1) * (images - WHITE)
