"""Noise synthesised in the Fourier domain: blue noise (as a mask) and brownish noise (added).

The reference (``BlueNoiseSample``, ``BrownishNoise`` in facebookresearch/augmentation-corruption)
builds a spectrum with a fixed power profile around the centre frequency and random phases, the
right half of the phases mirroring the left (``phases[::-1, ::-1]``), rolls it by half the size,
takes the real part of the inverse FFT and scales it to unit standard deviation. We do the same,
batched on the images' device, the phases expanded there from each image's seed
(:func:`~divfast.corruptions.random.device_uniform`); non-square images use each axis's own centre
and half-size.
"""

from __future__ import annotations

import torch

from divfast.corruptions._common import TWO_PI
from divfast.corruptions.random import device_uniform
from divfast.corruptions.registry import Corruption, register


def draw_phases(seeds: torch.Tensor, count: int, height: int, width: int, device):
    """The reference's random phases of ``count`` fields per image, expanded from ``seeds`` (B,) on
    ``device``: the left half (B, K, H, W//2), and for an odd width the upper half of the centre
    column (B, K, H//2) (its lower half mirrors it; its middle is 0)."""
    n_half = height * (width // 2)
    n_centre = height // 2 if width % 2 else 0
    u = device_uniform(seeds, count * (n_half + n_centre), device).view(-1, count, n_half + n_centre)
    phases = (u * TWO_PI).to(torch.float32)
    return phases[..., :n_half].reshape(-1, count, height, width // 2), phases[..., n_half:]


def _rolled_source_index(height: int, width: int, device) -> torch.Tensor:
    """For each position of the rolled full spectrum (H*W,), where its phase lives in the source
    ``[left half (H, W//2) | centre column (H//2)]`` flattened: mirroring, the centre column and the
    roll become one gather instead of flips, concatenations and a roll."""
    half_w = width // 2
    y = (torch.arange(height, device=device).view(-1, 1) - height // 2) % height  # un-rolled row
    x = (torch.arange(width, device=device).view(1, -1) - width // 2) % width  # un-rolled column
    centre_x = half_w if width % 2 else -1  # odd widths: the middle column
    right = x >= width - half_w
    src_y = torch.where(right, height - 1 - y, y)
    src_x = torch.where(right, width - 1 - x, x)
    index = src_y * half_w + src_x  # left half, or the mirrored left half
    # Centre column: rows < H//2 drawn, the middle row (odd H) 0, the rest mirror the first rows.
    n_centre = height // 2
    centre_row = torch.where(y < n_centre, y, height - 1 - y)
    zero_slot = height * half_w + n_centre  # one past the centre draws: a phase of 0
    centre_index = torch.where((height % 2 == 1) & (y == n_centre), zero_slot, height * half_w + centre_row)
    index = torch.where(x == centre_x, centre_index, index)
    return index.flatten()


def spectral_noise(half: torch.Tensor, centre: torch.Tensor, height: int, width: int,
                   profile: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise fields (B, K, H, W) with power ``|f|`` (``"blue"``) or ``1 / (|f|^2 + 1)``
    (``"brownish"``) around the centre frequency, and their standard deviations (B, K, 1, 1):
    ``noise / std`` is the reference's unit-variance field (the caller folds the division into its
    own scaling)."""
    device = half.device
    b, k = half.shape[:2]
    source = torch.cat((half.flatten(-2), centre, half.new_zeros(b, k, 1)), dim=-1)
    phases = source.index_select(-1, _rolled_source_index(height, width, device))  # (B, K, H*W)
    rows = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1) - height / 2
    cols = torch.arange(width, device=device, dtype=torch.float32).view(1, -1) - width / 2
    dist2 = rows * rows + cols * cols
    power = torch.sqrt(dist2) if profile == "blue" else 1.0 / (dist2 + 1.0)  # (H, W), un-rolled
    power = torch.roll(power, shifts=(height // 2, width // 2), dims=(0, 1)).flatten()
    spectrum = torch.polar(power.expand_as(phases), phases).view(b, k, height, width)
    noise = torch.fft.ifft2(spectrum).real
    return noise, noise.std(dim=(-2, -1), correction=0, keepdim=True)


@register
class BlueNoiseSample(Corruption):
    """Keeps the pixels where one blue-noise field exceeds ``3 * severity / 10 - 2.5`` and blacks out
    the rest (all three channels alike)."""

    name = "blue_noise_sample"
    reference = "blue_noise_sample"

    def sample(self, rng, height, width, severity):
        return {"phase_seed": rng.seed(), "threshold": 3.0 * severity / 10.0 - 2.5}

    def apply(self, images, params):
        _, _, h, w = images.shape
        half, centre = draw_phases(params["phase_seed"], 1, h, w, images.device)
        noise, std = spectral_noise(half, centre, h, w, "blue")
        keep = noise > params["threshold"].view(-1, 1, 1, 1) * std  # (B, 1, H, W)
        return images * keep


@register
class BrownishNoise(Corruption):
    """Adds an independent brownish (1 / (|f|^2 + 1) power) noise field to each channel with
    intensity ``64 * severity / 10``."""

    name = "brownish_noise"
    reference = "brownish_noise"

    def sample(self, rng, height, width, severity):
        return {"phase_seed": rng.seed(), "intensity": 64.0 * severity / 10.0}

    def apply(self, images, params):
        _, _, h, w = images.shape
        half, centre = draw_phases(params["phase_seed"], 3, h, w, images.device)
        noise, std = spectral_noise(half, centre, h, w, "brownish")
        return images + (params["intensity"].view(-1, 1, 1, 1) / std) * noise  # (B, 3, H, W)
