"""Noise synthesised in the Fourier domain: blue noise (as a mask) and brownish noise (added).

The reference (``BlueNoiseSample``, ``BrownishNoise`` in facebookresearch/augmentation-corruption)
builds a spectrum with a fixed power profile around the centre frequency and random phases, the
right half of the phases mirroring the left (``phases[::-1, ::-1]``), rolls it by half the size,
takes the real part of the inverse FFT and scales it to unit standard deviation. We do the same,
with the phase draws on the CPU stream and the FFTs batched on the images' device; non-square images
use each axis's own centre and half-size.
"""

from __future__ import annotations

import torch

from divfast.corruptions._common import TWO_PI
from divfast.corruptions.registry import Corruption, register


def _draw_phases(rng, count: int, height: int, width: int) -> dict:
    """The reference's random phases for ``count`` independent fields: the left half, and for an odd
    width the upper half of the centre column (its lower half mirrors it; its middle is 0)."""
    half = rng.uniform(0.0, TWO_PI, size=(count, height, width // 2))
    centre = rng.uniform(0.0, TWO_PI, size=(count, height // 2 if width % 2 else 0))
    return {"phase_half": half, "phase_centre": centre}


def _full_phases(half: torch.Tensor, centre: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, K, H, W//2) and (B, K, H//2 or 0) -> (B, K, H, W), mirrored as in the reference."""
    mirrored = torch.flip(half, dims=(-2, -1))
    if width % 2 == 0:
        return torch.cat((half, mirrored), dim=-1)
    middle = [centre]
    if height % 2:
        middle.append(centre.new_zeros(centre.shape[:-1] + (1,)))
    middle.append(torch.flip(centre, dims=(-1,)))
    column = torch.cat(middle, dim=-1).unsqueeze(-1)  # (B, K, H, 1)
    return torch.cat((half, column, mirrored), dim=-1)


def spectral_noise(half: torch.Tensor, centre: torch.Tensor, height: int, width: int,
                   profile: str) -> torch.Tensor:
    """Unit-variance noise fields (B, K, H, W) with power ``|f|`` (``"blue"``) or ``1 / (|f|^2 + 1)``
    (``"brownish"``) around the centre frequency."""
    device = half.device
    rows = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1) - height / 2
    cols = torch.arange(width, device=device, dtype=torch.float32).view(1, -1) - width / 2
    dist2 = rows * rows + cols * cols
    power = torch.sqrt(dist2) if profile == "blue" else 1.0 / (dist2 + 1.0)  # (H, W)
    phases = _full_phases(half, centre, height, width)
    spectrum = torch.polar(power.expand_as(phases).contiguous(), phases)
    spectrum = torch.roll(spectrum, shifts=(height // 2, width // 2), dims=(-2, -1))
    noise = torch.fft.ifft2(spectrum).real
    return noise / noise.std(dim=(-2, -1), correction=0, keepdim=True)


@register
class BlueNoiseSample(Corruption):
    """Keeps the pixels where one blue-noise field exceeds ``3 * severity / 10 - 2.5`` and blacks out
    the rest (all three channels alike)."""

    name = "blue_noise_sample"
    reference = "blue_noise_sample"

    def sample(self, rng, height, width, severity):
        return {**_draw_phases(rng, 1, height, width), "threshold": 3.0 * severity / 10.0 - 2.5}

    def apply(self, images, params):
        _, _, h, w = images.shape
        noise = spectral_noise(params["phase_half"], params["phase_centre"], h, w, "blue")  # (B, 1, H, W)
        keep = noise > params["threshold"].view(-1, 1, 1, 1)
        return images * keep


@register
class BrownishNoise(Corruption):
    """Adds an independent brownish (1 / (|f|^2 + 1) power) noise field to each channel with
    intensity ``64 * severity / 10``."""

    name = "brownish_noise"
    reference = "brownish_noise"

    def sample(self, rng, height, width, severity):
        return {**_draw_phases(rng, 3, height, width), "intensity": 64.0 * severity / 10.0}

    def apply(self, images, params):
        _, _, h, w = images.shape
        noise = spectral_noise(params["phase_half"], params["phase_centre"], h, w, "brownish")  # (B, 3, H, W)
        return images + params["intensity"].view(-1, 1, 1, 1) * noise
