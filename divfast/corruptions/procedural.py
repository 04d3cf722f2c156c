"""Procedural noise fields added to or blended with the image: plasma, Perlin, concentric and single
frequency sine waves.

Each follows the reference's formula pixel for pixel (``PlasmaNoise``, ``PerlinNoise``,
``CocentricSineWaves``, ``SingleFrequencyGreyscale`` in facebookresearch/augmentation-corruption),
evaluated for the whole batch at once. Lengths given in pixels at 224 px scale with the image's
smaller side; positions scale with each axis.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from divfast.corruptions._common import TWO_PI, per_image, pixel_grid
from divfast.corruptions.registry import Corruption, register

PLASMA_MAX_ITERATIONS = 6


@register
class Plasma(Corruption):
    """An iterated flow field over the pixel grid coloured ``(sin(x - t), sin((x + y + sin t) / 2),
    sin(y + t))`` and blended in: ``(1 - I/255) * img + I * noise`` with ``I = 64 * severity / 10``.

    Per image: time U(0, 6 pi), iterations in {4, 5, 6}, sharpness U(0.5, 1), scale U(0.075, 0.2)
    of the image size. The reference's fourth state component starts at 0 and is only ever
    multiplied, so it stays 0 and is dropped here.
    """

    name = "plasma"
    reference = "plasma_noise"
    aliases = ("plasma_noise",)

    def sample(self, rng, height, width, severity):
        return {
            "time": rng.uniform(0.0, 6.0 * math.pi),
            "iterations": rng.integers(4, PLASMA_MAX_ITERATIONS + 1),
            "sharpness": rng.uniform(0.5, 1.0),
            "scale": rng.uniform(0.075, 0.2) * min(height, width),
            "intensity": 64.0 * severity / 10.0,
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        t = per_image(params["time"])
        scale = per_image(params["scale"])
        x = (cols / scale).expand(-1, h, -1)  # (B, H, W); x runs along columns as in the reference
        y = (rows / scale).expand(-1, -1, w)
        f0 = torch.ones_like(t)  # the reference's i[0], i[1], i[2]
        f1 = torch.ones_like(t)
        f2 = torch.ones_like(t)
        shrink = 2.25 - per_image(params["sharpness"])
        iterations = per_image(params["iterations"])
        for step in range(PLASMA_MAX_ITERATIONS):
            r0 = torch.cos(y * f0 + t / f1) / f2
            r1 = torch.sin(x * f0 + t / f1) / f2
            r0, r1 = r0 - 0.3 * r1, r1 + 0.3 * r0
            live = iterations > step  # images with fewer iterations stop early
            x = torch.where(live, x + r0, x)
            y = torch.where(live, y + r1, y)
            f0, f1, f2 = f0 * 1.93, f1 * 1.15, f2 * shrink
        noise = torch.stack((torch.sin(x - t), torch.sin((x + y + torch.sin(t)) * 0.5),
                             torch.sin(y + t)), dim=1)  # (B, 3, H, W)
        intensity = params["intensity"].view(-1, 1, 1, 1)
        return (1.0 - intensity / 255.0) * images + intensity * noise


def _perlin_tables(rng) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``PerlinNoiseGenerator`` tables: 514 unit gradients (components drawn from
    {-256..255}/256) and a shuffled permutation of 0..255 repeated past 256.

    A zero gradient (probability 512**-2 each) has no direction; the reference divides by its zero
    norm (NaN pixels), we use (1, 0).
    """
    b = 256
    raw = (rng.integers(0, 2 * b, size=(2 * b + 2, 2)) - b) / b
    norm = np.linalg.norm(raw, axis=1, keepdims=True)
    grads = np.where(norm > 0, raw / np.where(norm > 0, norm, 1.0), np.array([1.0, 0.0]))
    perm = np.arange(2 * b + 2)
    swaps = rng.integers(0, b, size=b)
    for i, j in zip(range(b - 1, -1, -1), swaps):  # 256 scalar swaps per image: cheap
        perm[i], perm[j] = perm[j], perm[i]
    perm[b:] = perm[: b + 2]
    grads[b:] = grads[: b + 2]
    return perm, grads


def _perlin_noise(perm: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Classic 2-D Perlin noise with per-image tables ``perm`` (B, 514) int64 and ``grads``
    (B, 514, 2), at non-negative coordinates ``x`` (H,) along rows and ``y`` (W,) along columns ->
    (B, H, W). The reference adds 4096 (a multiple of 256) first; for x >= 0 that changes nothing."""
    b = perm.shape[0]
    bx0 = torch.floor(x).long() % 256  # (H,)
    by0 = torch.floor(y).long() % 256  # (W,)
    rx0, ry0 = x - torch.floor(x), y - torch.floor(y)
    i = perm[:, bx0]  # (B, H)
    j = perm[:, (bx0 + 1) % 256]
    by1 = (by0 + 1) % 256
    # Gradient of table entry perm[k] for every k, packed so one gather fetches both components.
    g = torch.gather(grads, 1, perm.unsqueeze(-1).expand(-1, -1, 2)).contiguous()  # (B, 514, 2)

    def corner(rows_idx, cols_idx):
        flat = (rows_idx.unsqueeze(-1) + cols_idx.view(1, 1, -1)).reshape(b, -1)  # (B, H*W)
        gx = torch.gather(g[..., 0], 1, flat).view(b, x.numel(), y.numel())
        gy = torch.gather(g[..., 1], 1, flat).view(b, x.numel(), y.numel())
        return gx, gy

    sx = (rx0 * rx0 * (3.0 - 2.0 * rx0)).view(1, -1, 1)
    sy = (ry0 * ry0 * (3.0 - 2.0 * ry0)).view(1, 1, -1)
    rx0, ry0 = rx0.view(1, -1, 1), ry0.view(1, 1, -1)
    rx1, ry1 = rx0 - 1.0, ry0 - 1.0
    g00, g10, g01, g11 = corner(i, by0), corner(j, by0), corner(i, by1), corner(j, by1)
    u = rx0 * g00[0] + ry0 * g00[1]
    v = rx1 * g10[0] + ry0 * g10[1]
    a = u + sx * (v - u)
    u = rx0 * g01[0] + ry1 * g01[1]
    v = rx1 * g11[0] + ry1 * g11[1]
    bb = u + sx * (v - u)
    return 1.5 * (a + sy * (bb - a))


@register
class PerlinNoise(Corruption):
    """Perlin turbulence (octaves 1, 2, 4, 8, 16) at a period of 32 px per 224 px, blended in:
    ``(1 - a) * img + 255 * a * clip(0.5 * turbulence + 0.5, 0, 1)`` with ``a = 0.5 * severity / 10``.
    Each image draws its own gradient and permutation tables."""

    name = "perlin_noise"
    reference = "perlin_noise"

    def sample(self, rng, height, width, severity):
        perm, grads = _perlin_tables(rng)
        return {"perm": perm, "grads": grads, "alpha": 0.5 * severity / 10.0}

    def apply(self, images, params):
        _, _, h, w = images.shape
        period = 32.0 * min(h, w) / 224.0
        x = torch.arange(h, device=images.device, dtype=torch.float32) / period
        y = torch.arange(w, device=images.device, dtype=torch.float32) / period
        turbulence = 0.0
        octave = 1.0
        while octave <= 16.0:
            turbulence = turbulence + _perlin_noise(params["perm"], params["grads"], octave * x,
                                                    octave * y).abs() / octave
            octave *= 2.0
        noise = (0.5 * turbulence + 0.5).clamp(0.0, 1.0).unsqueeze(1)  # (B, 1, H, W)
        alpha = params["alpha"].view(-1, 1, 1, 1)
        return (1.0 - alpha) * images + 255.0 * alpha * noise


@register
class ConcentricSineWaves(Corruption):
    """Rings around a random centre, wobbled by ``sin(freq * angle) * amplitude`` and wrapped every
    ``ring_width`` px into a sawtooth in [-0.5, 0.5), added with intensity ``128 * severity / 10``.
    Per image: centre U(0, size) per axis, freq U(0, 10), amplitude and ring width U(0, size / 10).
    (The reference spells it "cocentric"; both spellings are accepted.)"""

    name = "cocentric_sine_waves"
    reference = "cocentric_sine_waves"
    aliases = ("concentric_sine_waves",)

    def sample(self, rng, height, width, severity):
        size = min(height, width)
        return {
            "center_col": rng.uniform(0.0, width),
            "center_row": rng.uniform(0.0, height),
            "freq": rng.uniform(0.0, 10.0),
            "amplitude": rng.uniform(0.0, size / 10.0),
            # U(0, size/10) as the reference; a width of exactly 0 (probability 2**-53) would be 0/0.
            "ring_width": max(rng.uniform(0.0, size / 10.0), 1e-6),
            "intensity": 128.0 * severity / 10.0,
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        dx = cols - per_image(params["center_col"])
        dy = rows - per_image(params["center_row"])
        angle = torch.atan2(dx, dy) * per_image(params["freq"])
        ring = per_image(params["ring_width"])
        radius = torch.sqrt(dx * dx + dy * dy) + torch.sin(angle) * per_image(params["amplitude"])
        noise = torch.remainder(radius, ring) / ring - 0.5  # (B, H, W)
        return images + params["intensity"].view(-1, 1, 1, 1) * noise.unsqueeze(1)


@register
class SingleFrequencyGreyscale(Corruption):
    """One plane wave ``sin(x * f_x + y * f_y + phase)`` added in grey with intensity
    ``196 * severity / 10``. Per image: one frequency U(-pi, pi), the other U(-|f|, |f|), their
    order shuffled; phase U(0, 2 pi). Frequencies are per pixel, as in the reference."""

    name = "single_frequency_greyscale"
    reference = "single_frequency_greyscale"

    def sample(self, rng, height, width, severity):
        magnitude = rng.uniform(-math.pi, math.pi)
        other = rng.uniform(-abs(magnitude), abs(magnitude))
        swap = rng.random() < 0.5
        return {
            "freq_col": other if swap else magnitude,
            "freq_row": magnitude if swap else other,
            "phase": rng.uniform(0.0, TWO_PI),
            "intensity": 196.0 * severity / 10.0,
        }

    def apply(self, images, params):
        _, _, h, w = images.shape
        rows, cols = pixel_grid(h, w, images.device)
        noise = torch.sin(cols * per_image(params["freq_col"]) + rows * per_image(params["freq_row"])
                          + per_image(params["phase"]))
        return images + params["intensity"].view(-1, 1, 1, 1) * noise.unsqueeze(1)
