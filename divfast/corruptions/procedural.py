"""Procedural noise fields added to or blended with the image: plasma, Perlin, concentric and single
frequency sine waves.

Each follows the reference's formula pixel for pixel (``PlasmaNoise``, ``PerlinNoise``,
``CocentricSineWaves``, ``SingleFrequencyGreyscale`` in facebookresearch/augmentation-corruption),
evaluated for the whole batch at once. Lengths given in pixels at 224 px scale with the image's
smaller side; positions scale with each axis.
"""

from __future__ import annotations

import math

import torch

from divfast.corruptions._common import TWO_PI, exact_matmul_dtype, per_image, pixel_grid
from divfast.corruptions.random import device_uniform
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


def perlin_tables(seeds: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Perlin tables expanded from ``seeds`` (B,) on ``device``: the permutation (B, 514)
    and the unit gradients (B, 514, 2), laid out as the reference's ``PerlinNoiseGenerator`` leaves
    them (entries 256..513 repeat 0..257).

    Gradient components are drawn from {-256, ..., 255} / 256 as in the reference. Differences: the
    permutation is uniformly random (an argsort of uniforms) where the reference's swap loop
    (``p[i], p[rand % 256]`` for i from 255 down) favours some orders; a zero gradient (probability
    512**-2 each) becomes (1, 0) where the reference divides by its zero norm and writes NaN pixels.
    """
    u = device_uniform(seeds, 2 * 256 + 256, device)  # (B, 768)
    raw = (torch.floor(u[:, :512] * 512.0).clamp_(max=511.0) - 256.0).view(-1, 256, 2) / 256.0
    norm = raw.norm(dim=-1, keepdim=True)
    unit = torch.tensor([1.0, 0.0], device=device, dtype=raw.dtype)
    grads = torch.where(norm > 0, raw / norm.clamp_min(1e-12), unit).to(torch.float32)
    perm = torch.argsort(u[:, 512:], dim=1, stable=True)  # (B, 256)
    return (torch.cat((perm, perm, perm[:, :2]), dim=1),
            torch.cat((grads, grads, grads[:, :2]), dim=1))


def _lattice_weights(coords: torch.Tensor, size: int, slope: bool) -> torch.Tensor:
    """Sparse-as-dense interpolation matrix (len(coords), size) of Perlin noise along one axis.

    A point at ``t`` in lattice cell ``k = floor(t)``, offset ``r = t - k``, weights corner ``k`` by
    ``(1 - s(r))`` and corner ``k + 1`` by ``s(r)`` (``s`` the cubic s-curve); with ``slope`` the
    weights also carry the offset to the corner (``r`` and ``r - 1``), the factor that multiplies the
    corner gradient's component along this axis.
    """
    cell = torch.floor(coords)
    r = coords - cell
    s = r * r * (3.0 - 2.0 * r)
    w0, w1 = 1.0 - s, s
    if slope:
        w0, w1 = w0 * r, w1 * (r - 1.0)
    out = coords.new_zeros(coords.numel(), size)
    rows = torch.arange(coords.numel(), device=coords.device)
    out[rows, cell.long()] = w0
    out[rows, cell.long() + 1] = w1
    return out


def _perlin_noise(perm: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  x_max: float, y_max: float) -> torch.Tensor:
    """Classic 2-D Perlin noise with per-image tables ``perm`` (B, 514) int64 and ``grads``
    (B, 514, 2), at non-negative coordinates ``x`` (H,) along rows and ``y`` (W,) along columns, at
    most ``x_max`` and ``y_max`` (host numbers, so no device sync) -> (B, H, W). The reference adds
    4096 (a multiple of 256) first; for x >= 0 that changes nothing.

    The reference evaluates, per pixel, ``sum over the 4 cell corners of s_x s_y (r_x g_x + r_y g_y)``
    with ``g`` the gradient at the corner. Every factor but ``g`` depends on the row alone or the
    column alone, so the whole field is two matrix products per gradient component,
    ``Wx_slope @ Gx @ Wy^T + Wx @ Gy @ Wy_slope^T``, over the lattice of corner gradients ``G``
    (B, X, Y, 2): no per-pixel table lookups.
    """
    nx = math.floor(x_max) + 3  # lattice corners spanned (+1 spare: float32 rounding of x), both axes
    ny = math.floor(y_max) + 3
    lat_x = torch.arange(nx, device=perm.device) % 256
    lat_y = torch.arange(ny, device=perm.device) % 256
    # The reference's corner (X, Y) uses gradient grads[perm[perm[X] + Y]] (indices mod 256).
    corner = perm.gather(1, lat_x.expand(perm.shape[0], -1)).unsqueeze(-1) + lat_y.view(1, 1, -1)
    table = perm.gather(1, corner.flatten(1))  # (B, X*Y)
    g = grads.gather(1, table.unsqueeze(-1).expand(-1, -1, 2)).view(perm.shape[0], nx, ny, 2)
    dtype = exact_matmul_dtype(perm.device)
    x, y, g = x.to(dtype), y.to(dtype), g.to(dtype)
    wx, wx_slope = _lattice_weights(x, nx, False), _lattice_weights(x, nx, True)  # (H, X)
    wy, wy_slope = _lattice_weights(y, ny, False), _lattice_weights(y, ny, True)  # (W, Y)
    noise = wx_slope @ g[..., 0] @ wy.T + wx @ g[..., 1] @ wy_slope.T  # (B, H, W)
    return (1.5 * noise).to(torch.float32)


@register
class PerlinNoise(Corruption):
    """Perlin turbulence (octaves 1, 2, 4, 8, 16) at a period of 32 px per 224 px, blended in:
    ``(1 - a) * img + 255 * a * clip(0.5 * turbulence + 0.5, 0, 1)`` with ``a = 0.5 * severity / 10``.
    Each image draws its own gradient and permutation tables."""

    name = "perlin_noise"
    reference = "perlin_noise"

    def sample(self, rng, height, width, severity):
        return {"table_seed": rng.seed(), "alpha": 0.5 * severity / 10.0}

    def apply(self, images, params):
        _, _, h, w = images.shape
        period = 32.0 * min(h, w) / 224.0
        x = torch.arange(h, device=images.device, dtype=torch.float32) / period
        y = torch.arange(w, device=images.device, dtype=torch.float32) / period
        perm, grads = perlin_tables(params["table_seed"], images.device)
        turbulence = 0.0
        octave = 1.0
        while octave <= 16.0:
            noise = _perlin_noise(perm, grads, octave * x, octave * y, octave * (h - 1) / period,
                                  octave * (w - 1) / period)
            turbulence = turbulence + noise.abs() / octave
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
