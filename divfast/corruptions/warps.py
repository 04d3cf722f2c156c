"""Corruptions that move pixels: water drop and caustic refraction.

Both resample the image bilinearly with the reference's border rule (neighbours outside the image
count as black), following ``WaterDrop`` and ``CausticRefraction`` in
facebookresearch/augmentation-corruption. The reference's per-pixel 3-D refraction (a rotation
matrix inverted per pixel) reduces to a closed form, derived in :func:`_refraction_offset`.
"""

from __future__ import annotations

import math

import torch

from divfast.corruptions._common import TWO_PI, bilinear_sample, gaussian_blur, per_image, pixel_grid
from divfast.corruptions.registry import Corruption, register


@register
class WaterDrop(Corruption):
    """Concentric ripples around a random centre: inside radius ``size // 2`` each pixel samples the
    input at ``p + A * sin(2 pi d / wavelength - phase) * (wavelength / d) * (p - c)``, ``d = |p - c|``,
    so no pixel moves further than ``A * wavelength``; outside the radius nothing changes.
    ``A = 0.25 * severity / 10``; per image: centre U(0.25, 0.75) of each axis, wavelength
    U(0.05, 0.2) of the size, phase U(0, 2 pi)."""

    name = "waterdrop"
    reference = "water_drop"
    aliases = ("water_drop",)

    def sample(self, rng, height, width, severity):
        size = min(height, width)
        return {
            "center_row": rng.uniform(0.25, 0.75) * height,
            "center_col": rng.uniform(0.25, 0.75) * width,
            "radius": float(size // 2),
            "amplitude": 0.25 * severity / 10.0,
            "wavelength": rng.uniform(0.05, 0.2) * size,
            "phase": rng.uniform(0.0, TWO_PI),
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        dr = rows - per_image(params["center_row"])  # (B, H, 1)
        dc = cols - per_image(params["center_col"])  # (B, 1, W)
        dist = torch.sqrt(dr * dr + dc * dc)  # (B, H, W)
        wavelength = per_image(params["wavelength"])
        amount = per_image(params["amplitude"]) * torch.sin(dist / wavelength * TWO_PI - per_image(params["phase"]))
        amount = torch.where(dist > 0, amount * wavelength / dist.clamp_min(1e-12), amount)
        amount = torch.where(dist <= per_image(params["radius"]), amount, torch.zeros_like(amount))
        return bilinear_sample(images, rows + amount * dr, cols + amount * dc)


def caustic_field(time: torch.Tensor, size: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference's caustic pattern (a 5-step iterated trigonometric map, tiled every ``size`` px)
    in [0, 1] for each image: ``time``, ``size`` (B,) -> (B, H, W) float64.

    Computed in float64: its arguments sit near -250, where float32 keeps only ~1e-5 of the phase,
    and the refraction downstream has two cliffs (the straight-ray cutoff, the rounding of the offset
    to 1e-3 px) that turn last-bit differences into visible ones. In float64 (kept through the blur,
    the normals and the offsets) the result matches the reference's float64 and no longer depends on
    which SIMD lane (batch position) computed it.
    """
    rows, cols = pixel_grid(height, width, time.device)
    rows, cols = rows.double(), cols.double()
    size = per_image(size.double())
    p0 = torch.remainder(rows / size, 1.0) * TWO_PI - 250.0  # (B, H, 1)
    p1 = torch.remainder(cols / size, 1.0) * TWO_PI - 250.0  # (B, 1, W)
    a0, a1 = p0 * 0.005, p1 * 0.005  # the reference's inten
    time = per_image(time.double())
    # Each step needs sin/cos of t -+ i0 and t -+ i1 for two different t (this step's update, and the
    # length term with the new i); angle addition gets all of them from sin/cos of i0 and i1.
    s0, c0, s1, c1 = torch.sin(p0), torch.cos(p0), torch.sin(p1), torch.cos(p1)
    c = 1.0
    for n in range(5):
        t = time * (1.0 - 3.5 / (n + 1))
        st, ct = torch.sin(t), torch.cos(t)
        # i0 = p0 + cos(t - i0) + sin(t + i1); i1 = p1 + sin(t - i1) + cos(t + i0), fused multiply-adds
        i0 = torch.addcmul(torch.addcmul(torch.addcmul(torch.addcmul(p0, ct, c0), st, s0), st, c1), ct, s1)
        i1 = torch.addcmul(torch.addcmul(torch.addcmul(torch.addcmul(p1, st, c1), ct, s1, value=-1.0),
                                         ct, c0), st, s0, value=-1.0)
        s0, c0, s1, c1 = torch.sin(i0), torch.cos(i0), torch.sin(i1), torch.cos(i1)
        a = a0 / torch.addcmul(s0 * ct, c0, st)  # p0 * inten / sin(i0 + t)
        b = a1 / torch.addcmul(c1 * ct, s1, st, value=-1.0)  # p1 * inten / cos(i1 + t)
        c = c + torch.rsqrt(torch.addcmul(a * a, b, b))
    c = 1.17 - torch.exp(1.4 * torch.log(c / 5.0))  # c >= 1: (c / 5) ** 1.4
    c = c * c
    c = c * c  # |c| ** 8 by squaring: exact, whichever code path runs it
    return (c * c).clamp(0.0, 1.0)


def _refraction_offset(normal_row, normal_col, normal_z, eta: float):
    """Lateral offset of the ray (0, 0, 1) refracted into a surface with unit normal n.

    The reference rotates (cos b, sin b, 0), b = asin(sin(a) / eta), a = acos(n_z), into the frame
    (n, n x s, s) with s = (0, 0, 1) x n / |.|; its (row, col) part is
    ``(n_row, n_col) * (sqrt(1 - r^2 / eta^2) - n_z / eta)`` with ``r^2 = n_row^2 + n_col^2``. Nearly
    flat normals (|n_z| >= 1 - 1e-3) pass the ray straight, as in the reference.
    """
    r2 = normal_row * normal_row + normal_col * normal_col
    factor = torch.sqrt(1.0 - r2 / (eta * eta)) - normal_z / eta
    straight = normal_z.abs() >= 1.0 - 1e-3
    factor = torch.where(straight, torch.zeros_like(factor), factor)
    return normal_row * factor, normal_col * factor


@register
class CausticRefraction(Corruption):
    """Light through a wavy water surface: the caustic pattern (blurred with sigma 1) is read as a
    height field; each pixel samples the image along the refracted ray (eta 4, lens scale
    ``0.5 * size * severity / 10``) and gains ``2 * severity / 10`` times the field's slope as
    lighting. Per image: time U(0.5, 2), tile size U(0.75, 1.25) of the image size."""

    name = "caustic_refraction"
    reference = "caustic_refraction"
    eta = 4.0

    def sample(self, rng, height, width, severity):
        size = min(height, width)
        return {
            "time": rng.uniform(0.5, 2.0),
            "size": rng.uniform(0.75, 1.25) * size,
            "lens_scale": 0.5 * size * severity / 10.0,
            "lighting": 2.0 * severity / 10.0,
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        field = gaussian_blur(caustic_field(params["time"], params["size"], h, w), sigma=1.0)
        padded = torch.nn.functional.pad(field, (1, 1, 1, 1))  # outside the image the field is 0
        north = padded[:, 1:-1, :-2]  # (row, col - 1), the reference's names
        south = padded[:, 1:-1, 2:]   # (row, col + 1)
        west = padded[:, :-2, 1:-1]   # (row - 1, col)
        east = padded[:, 2:, 1:-1]    # (row + 1, col)
        n_row, n_col = east - west, south - north
        inv = torch.rsqrt(n_row * n_row + n_col * n_col + 1.0)
        off_row, off_col = _refraction_offset(n_row * inv, n_col * inv, inv, self.eta)
        lens = per_image(params["lens_scale"].double())
        off_row = torch.round(off_row * lens, decimals=3)  # the reference rounds the vector to 1e-3
        off_col = torch.round(off_col * lens, decimals=3)
        rows, cols = pixel_grid(h, w, images.device)
        out = bilinear_sample(images, (rows + off_row).float(), (cols + off_col).float())
        light = per_image(params["lighting"].double()) * ((north - south) + (east - west))  # (B, H, W)
        return out + (255.0 * light).float().unsqueeze(1)
