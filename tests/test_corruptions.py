"""divfast.corruptions: oracles, the reference's statistics, determinism, devices, coverage, bad input.

The oracles (tests/corruption_oracle.py) are slow scalar transcriptions of the reference
(facebookresearch/augmentation-corruption, imagenet_c_bar/corrupt.py) that take the same per-image
parameter dict as divfast, so randomness is shared and only the maths is compared.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import corruption_oracle as oracle
from divfast.corruptions import (
    corrupt,
    corruption_aliases,
    corruption_parameters,
    format_dataset_spec,
    get_corruption,
    list_corruptions,
    parse_dataset_spec,
)
from divfast.corruptions import random as divfast_random
from divfast.corruptions.random import ImageRandom, derive_seed
from divfast.corruptions.warps import _refraction_offset
from divfast.errors import DivfastError

NAMES = list_corruptions()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """These tensors are tiny, so intra-op threads only add synchronisation; on a busy 2-core machine
    their spin-waits made this module 5x slower (9 s vs 48 s). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images_u8(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)


def device_params(params, device="cpu"):
    """What corrupt() hands to apply(): floating parameters as float32, the rest as they are."""
    return {k: (v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device))
            for k, v in params.items()}


def hwc(t):
    """(3, H, W) tensor -> (H, W, 3) float64 NumPy."""
    return t.permute(1, 2, 0).double().cpu().numpy()


def test_twelve_corruptions_in_the_papers_order():
    assert NAMES == ["lines", "plasma", "checkerboard", "waterdrop", "caustic_refraction",
                     "inverse_sparkles", "sparkles", "perlin_noise", "blue_noise_sample",
                     "cocentric_sine_waves", "single_frequency_greyscale", "brownish_noise"]
    assert set(oracle.ORACLES) == set(NAMES)


# ------------------------------------------------------------------------------------------------
# 1. Oracles: apply() (float32, before clipping) against a scalar float64 transcription of the
#    reference fed the same parameters.
#
# Tolerances on the 0-255 scale, float32 against float64:
# * checkerboard, blue_noise_sample: exact. They only select pixels (cell parity, noise > threshold);
#   float32 could only disagree for a pixel within ~1e-6 of a cell edge or of the threshold, which
#   the fixed seeds here do not produce.
# * lines, perlin, single frequency, brownish, waterdrop: 1e-2. Errors are a few float32 ulps of
#   coordinates <= 16 px, i.e. ~1e-5 relative, times intensities <= 255 (measured <= 3e-3).
# * cocentric_sine_waves: 1e-2 likewise (measured 3e-3). The sawtooth wraps, so a radius within a
#   float32 ulp of a ring boundary would jump by the intensity; the fixed seeds have none.
# * plasma, sparkles, inverse_sparkles: 5e-2. Plasma's flow multiplies its frequency by 1.93 per
#   iteration (up to 1.93**5 ~ 27), so a 1e-7 relative phase error reaches ~5e-4 of the noise, times
#   intensity <= 64 (measured 1.1e-2). The stars raise (L^2 / d^2) to the power 1.3 near their centre
#   and edge, where the weight is steep (measured 1.1e-2).
# * caustic_refraction: see test_caustic_refraction_matches_oracle.
# ------------------------------------------------------------------------------------------------

ORACLE_ATOL = {
    "lines": 1e-2, "plasma": 5e-2, "checkerboard": 0.0, "waterdrop": 1e-2, "inverse_sparkles": 5e-2,
    "sparkles": 5e-2, "perlin_noise": 1e-2, "blue_noise_sample": 0.0, "cocentric_sine_waves": 1e-2,
    "single_frequency_greyscale": 1e-2, "brownish_noise": 1e-2,
}
ORACLE_SIZES = [(9, 11), (12, 12), (16, 13), (11, 10), (8, 30), (30, 8)]
ORACLE_SEVERITIES = [0.0, 4.0, 10.0]
ORACLE_SEEDS = [0, 1]


def _oracle_cases(name, height, width):
    """Yields (severity, seed, input float32 batch, params, apply() output, corrupt() uint8 output)."""
    corruption = get_corruption(name)
    for seed in ORACLE_SEEDS:
        x = images_u8(2, height, width, seed=100 + seed)
        for severity in ORACLE_SEVERITIES:
            params = corruption_parameters(name, severity, height, width, keys=[5, 6], seed=seed)
            y = corruption.apply(x.float(), device_params(params))
            out = corrupt(x, name, severity, seed=seed, keys=[5, 6])
            yield severity, seed, x, params, y, out


@pytest.mark.parametrize("size", ORACLE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", [n for n in NAMES if n != "caustic_refraction"])
def test_matches_oracle(name, size):
    atol = ORACLE_ATOL[name]
    for severity, seed, x, params, y, out in _oracle_cases(name, *size):
        for b in range(x.shape[0]):
            want = oracle.ORACLES[name](hwc(x[b]), oracle.image_params(params, b))
            got = hwc(y[b])
            err = np.abs(got - want)
            where = np.unravel_index(err.argmax(), err.shape)
            assert err.max() <= atol, (f"{name} severity {severity} seed {seed} image {b}: "
                                       f"max |apply - oracle| = {err.max():.4g} at {where}")
            # End to end: corrupt() clips and rounds the same values to uint8.
            diff = np.abs(hwc(out[b]) - np.clip(want, 0, 255))
            assert diff.max() <= 0.5 + atol + 1e-6, (name, severity, seed, b, diff.max())


@pytest.mark.parametrize("size", ORACLE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_caustic_refraction_matches_oracle(size):
    """Tolerance: the caustic pattern is evaluated at p ~ -250 (the reference's offset), where a float32
    ulp is 1.5e-5, so divfast's field differs from the float64 one by ~5e-5 (~1.5e-5 after the blur).

    * Through the lighting term (255 * lighting <= 2 * two differences) that is <= 0.05 on a flat
      image, checked on its own below.
    * The refraction offset is rounded to 1e-3 px like the reference, so float32 noise can flip one
      rounding step: the sample moves by 1e-3 px per axis, up to 255 * 2e-3 ~ 0.5 on a random image
      whose neighbours differ by up to 255. Hence 0.75 everywhere, but 0.02 for 90 % of the values.
    * The reference passes the ray straight where n_z >= 1 - 1e-3 and refracts it by a finite
      amount (~0.1 px at severity 10) just below: a discontinuity. The ~2e-6 float32 error of n_z can
      put a pixel within 1e-5 of that threshold on the other side (seen at 30x8, severity 10), so
      such pixels are left out.
    An error in the geometry (axes swapped, a wrong sign or formula) costs tens of levels everywhere."""
    name = "caustic_refraction"
    for severity, seed, x, params, y, out in _oracle_cases(name, *size):
        for b in range(x.shape[0]):
            p = oracle.image_params(params, b)
            want = oracle.caustic_refraction(hwc(x[b]), p)
            near_threshold = np.abs(oracle.caustic_normal_z(p, *size) - (1 - 1e-3)) < 1e-5
            assert near_threshold.mean() < 0.05
            err = np.abs(hwc(y[b]) - want)[~near_threshold]
            assert err.max() <= 0.75, (severity, seed, b, err.max())
            assert np.mean(err <= 0.02) >= 0.9, (severity, seed, b, np.mean(err <= 0.02))
            assert np.abs(hwc(out[b]) - np.clip(want, 0, 255))[~near_threshold].max() <= 1.25
        # On a flat image the warp moves nothing but the black border: the lighting, checked tightly.
        flat = torch.full_like(x, 100)
        y_flat = get_corruption(name).apply(flat.float(), device_params(params))
        for b in range(x.shape[0]):
            want = oracle.caustic_refraction(hwc(flat[b]), oracle.image_params(params, b))
            assert np.abs(hwc(y_flat[b]) - want).max() <= 0.05


def test_refraction_offset_closed_form_matches_long_way():
    """warps._refraction_offset (closed form) == the reference's refract() (acos/asin, cross products,
    an inverted rotation matrix), row/col part, in float64."""
    rng = np.random.default_rng(0)
    scales = rng.choice([1e-3, 0.05, 0.5, 3.0], size=(300, 1))
    slopes = np.concatenate([rng.normal(size=(300, 2)) * scales,
                             [[0.0, 0.0], [0.04, 0.0], [0.0, -0.05], [1e-4, 1e-4], [-20.0, 7.0]]])
    normals = np.concatenate([slopes, np.ones((len(slopes), 1))], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    t = torch.from_numpy(normals)
    for eta in (4.0, 1.5):
        got_row, got_col = _refraction_offset(t[:, 0], t[:, 1], t[:, 2], eta)
        for k, n in enumerate(normals):
            want = oracle.refract(np.array([0.0, 0.0, 1.0]), n, eta)
            assert abs(got_row[k].item() - want[0]) <= 1e-12, (n, eta)
            assert abs(got_col[k].item() - want[1]) <= 1e-12, (n, eta)
    straight = np.abs(normals[:, 2]) >= 1 - 1e-3  # the reference returns the incident ray unchanged
    assert straight.any() and (~straight).any()


# ------------------------------------------------------------------------------------------------
# 2. Statistics and properties from the reference's definitions
# ------------------------------------------------------------------------------------------------


def test_checkerboard_greys_a_fifth_at_severity_4():
    """Expected grey area = fraction / 2 (a Bernoulli(severity / 10) cell, on one parity of two).

    At 64 px the cells are 6.4-16 px, so an image holds ~16-100 cells and its grey fraction varies
    (standard deviation ~0.06 measured); the mean of 200 images then has a standard error of ~0.004
    (asserted < 0.01 below). 0.03 is several standard errors, while a wrong fraction (severity / 10:
    0.4), a lost parity (0.4) or cells that never turn on (0) lie far outside it."""
    n, size = 200, 64
    x = images_u8(n, size, size, seed=7)
    x[x == 128] = 127  # so that "grey" means "changed"
    out = corrupt(x, "checkerboard", 4.0, seed=0, keys=list(range(n)))
    grey = (out == 128).all(dim=1)  # (N, H, W)
    changed = (out != x).any(dim=1)
    assert torch.equal(grey, changed)  # every changed pixel is exactly (128, 128, 128) ...
    assert torch.equal(torch.where(changed.unsqueeze(1), x, out), x)  # ... and the rest untouched
    fraction = grey.double().mean(dim=(1, 2)).numpy()
    sem = fraction.std(ddof=1) / math.sqrt(n)
    assert sem < 0.01
    assert abs(fraction.mean() - 0.2) < 0.03, (fraction.mean(), sem)


def test_lines_count_matches_reference():
    """int(severity / 10 * size): 35 lines at 1.6 on 224 px (the smaller side for non-square images)."""
    params = corruption_parameters("lines", 1.6, 224, 224, keys=[0, 1, 2], seed=0)
    assert params["row"].shape == (3, int(0.16 * 224)) == (3, 35)
    assert params["col"].shape == params["angle"].shape == (3, 35)
    assert torch.all(params["half_length"] == 224)
    assert corruption_parameters("lines", 1.6, 224, 300, keys=[0], seed=0)["row"].shape == (1, 35)
    assert corruption_parameters("lines", 4.0, 32, 32, keys=[0], seed=0)["row"].shape == (1, 12)
    rows, cols = params["row"], params["col"]
    assert ((rows >= 0) & (rows < 224) & (cols >= 0) & (cols < 224)).all()
    x = torch.full((3, 3, 224, 224), 200, dtype=torch.uint8)
    out = corrupt(x, "lines", 1.6, seed=0, keys=[0, 1, 2])
    assert ((out <= 200) & (out >= 128)).all() and (out < 200).any()


def _segment_distance(r, c, row0, col0, angle, half):
    d = np.array([math.cos(angle), math.sin(angle)])
    v = np.stack([r - row0, c - col0], axis=-1)
    t = np.clip(v @ d, -half, half)
    return np.linalg.norm(v - t[..., None] * d, axis=-1)


def test_single_line_only_touches_pixels_near_its_segment():
    size, severity = 32, 0.35  # int(0.035 * 32) = 1 line
    keys = list(range(20))
    params = corruption_parameters("lines", severity, size, size, keys=keys, seed=0)
    assert params["row"].shape == (20, 1)
    x = torch.full((20, 3, size, size), 200.0)
    y = get_corruption("lines").apply(x, device_params(params))
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for b in range(20):
        row0, col0 = params["row"][b, 0].item(), params["col"][b, 0].item()
        angle, half = params["angle"][b, 0].item(), params["half_length"][b].item()
        dist = _segment_distance(r, c, row0, col0, angle, half)
        out = y[b].numpy()
        assert (out[0] == out[1]).all() and (out[0] == out[2]).all()
        changed = out[0] != 200.0
        assert (dist[changed] < 1.0 + 1e-5).all()  # only within distance 1 of the segment
        assert ((out[0] >= 128.0 - 1e-3) & (out[0] <= 200.0)).all()  # toward grey, never past it
        # Pixels within 0.25 of the line, well inside the segment, get a weight >= 0.75.
        along = (r - row0) * math.cos(angle) + (c - col0) * math.sin(angle)
        perpendicular = np.abs((r - row0) * math.sin(angle) - (c - col0) * math.cos(angle))
        on_line = (perpendicular < 0.25) & (np.abs(along) < half - 1.0)
        assert on_line.sum() >= 3 and (out[0][on_line] <= 200.0 - 0.75 * 72.0 + 1e-3).all()


def test_waterdrop_leaves_outside_radius_unchanged():
    size, n = 48, 12
    x = images_u8(n, size, size + 9, seed=3)
    out = corrupt(x, "waterdrop", 7.0, seed=0, keys=list(range(n)))
    params = corruption_parameters("waterdrop", 7.0, size, size + 9, keys=list(range(n)), seed=0)
    r, c = np.meshgrid(np.arange(size), np.arange(size + 9), indexing="ij")
    for b in range(n):
        dist = np.hypot(r - params["center_row"][b].item(), c - params["center_col"][b].item())
        outside = torch.from_numpy(dist > params["radius"][b].item() + 1e-3)
        assert params["radius"][b].item() == size // 2
        assert torch.equal(out[b][:, outside], x[b][:, outside])
        assert (out[b][:, ~outside] != x[b][:, ~outside]).any()


def test_waterdrop_displacement_through_the_warp():
    """A float image whose channels hold the row and column index: bilinear sampling of a linear ramp
    returns the sampled position, so the output reads the warp directly. Where the source lies inside
    the image it equals the formula's p + A sin(2 pi d / L - phi) (L / d) (p - c), and moves at most
    A * L (the amplitude times the wavelength)."""
    h, w, n = 40, 50, 10
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    x = torch.stack([rows, cols, torch.zeros(h, w)]).expand(n, 3, h, w).contiguous()
    params = corruption_parameters("waterdrop", 10.0, h, w, keys=list(range(n)), seed=1)
    y = get_corruption("waterdrop").apply(x, device_params(params)).numpy()
    largest = 0.0
    for b in range(n):
        p = oracle.image_params(params, b)
        bound = p["amplitude"] * p["wavelength"]
        for r in range(h):
            for c in range(w):
                sr, sc = oracle.waterdrop_source(p, r, c)
                assert math.hypot(sr - r, sc - c) <= bound + 1e-9
                if 0 <= sr <= h - 1 and 0 <= sc <= w - 1:
                    assert abs(y[b, 0, r, c] - sr) < 2e-3 and abs(y[b, 1, r, c] - sc) < 2e-3, (b, r, c)
                    moved = math.hypot(y[b, 0, r, c] - r, y[b, 1, r, c] - c)
                    assert moved <= bound + 2e-3
                    largest = max(largest, moved / bound)
    assert largest > 0.9  # the bound is reached, not just respected


def test_plasma_change_is_bounded_by_its_intensity():
    """out = clip((1 - I/255) img + I noise) with |noise| <= 1, so out - img = I (noise - img/255) lies
    in [-I (1 + img/255), I (1 - img/255)]; clipping to [0, 255] only moves out toward img's side of
    the bound, and uint8 rounding adds 0.5. Where nothing clipped, the implied noise is in [-1, 1] and
    spans most of it."""
    n, size, severity = 6, 64, 4.0
    intensity = 64.0 * severity / 10.0
    x = images_u8(n, size, size, seed=11)
    out = corrupt(x, "plasma", severity, seed=0, keys=list(range(n))).double()
    xd = x.double()
    change = out - xd
    assert (change >= -intensity * (1 + xd / 255) - 0.5).all()
    assert (change <= intensity * (1 - xd / 255) + 0.5).all()
    unclipped = (out > 0) & (out < 255)
    noise = ((out - (1 - intensity / 255) * xd) / intensity)[unclipped]
    assert noise.abs().max() <= 1 + 0.5 / intensity + 1e-9
    assert noise.max() > 0.9 and noise.min() < -0.9
    params = corruption_parameters("plasma", severity, size, size, keys=[0], seed=0)
    assert params["intensity"].item() == pytest.approx(25.6)


def _uniform_span(values, lo, hi):
    """Values drawn U(lo, hi): inside [lo, hi) and, 400 of them, reaching within 5 % of both ends
    (a miss has probability 0.95**400 ~ 1e-9)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    margin = 0.05 * (hi - lo)
    inside = values.min() >= lo and values.max() < hi
    return inside and values.min() < lo + margin and values.max() > hi - margin


def test_parameter_distributions_match_the_reference():
    """sample() draws the reference's distributions (imagenet_c_bar/corrupt.py, sample_parameters),
    lengths scaled by the smaller side (224 here), positions by each axis (224 rows, 300 columns)."""
    h, w, size, n, s = 224, 300, 224, 400, 4.0
    keys = list(range(n))

    def params(name):
        return {k: v.numpy() for k, v in corruption_parameters(name, s, h, w, keys, seed=0).items()}

    two_pi = 2 * math.pi
    p = params("plasma")
    assert _uniform_span(p["time"], 0, 6 * math.pi) and _uniform_span(p["sharpness"], 0.5, 1.0)
    assert _uniform_span(p["scale"], 0.075 * size, 0.2 * size) and set(p["iterations"]) == {4, 5, 6}
    assert np.all(p["intensity"] == 64 * s / 10)
    p = params("checkerboard")
    assert _uniform_span(p["angle"], 0, two_pi) and _uniform_span(p["scale"], 0.1 * size, 0.25 * size)
    assert abs(p["grid"].mean() - s / 10) < 0.01
    p = params("lines")
    assert p["row"].shape == (n, int(s / 10 * size))
    assert _uniform_span(p["row"], 0, h) and _uniform_span(p["col"], 0, w)
    assert np.all(p["half_length"] == size)
    spread = p["angle"].max(axis=1) - p["angle"].min(axis=1)  # 2 pi * U(0.1, 1) * (u - 0.5) per image
    assert spread.max() <= two_pi and spread.min() < 0.3 * two_pi and spread.max() > 0.9 * two_pi
    p = params("waterdrop")
    assert _uniform_span(p["center_row"], 0.25 * h, 0.75 * h)
    assert _uniform_span(p["center_col"], 0.25 * w, 0.75 * w)
    assert _uniform_span(p["wavelength"], 0.05 * size, 0.2 * size)
    assert _uniform_span(p["phase"], 0, two_pi)
    assert np.all(p["radius"] == size // 2) and np.all(p["amplitude"] == 0.25 * s / 10)
    p = params("caustic_refraction")
    assert _uniform_span(p["time"], 0.5, 2.0) and _uniform_span(p["size"], 0.75 * size, 1.25 * size)
    assert np.allclose(p["lens_scale"], 0.5 * size * s / 10) and np.allclose(p["lighting"], 2 * s / 10)
    p = params("inverse_sparkles")
    assert _uniform_span(p["center_row"], 0.25 * h, 0.75 * h)
    assert _uniform_span(p["center_col"], 0.25 * w, 0.75 * w)
    assert p["rays"].min() == 50 and p["rays"].max() == 199 and np.all(p["radius"] == 0.25 * size)
    assert np.allclose(p["exponent"], (100 - (100 - 6.5 * s)) / 50)  # (100 - amount) / 50
    lengths = p["ray_lengths"] / p["radius"][:, None]  # 1 + 0.25 N(0, 1)
    assert abs(lengths.mean() - 1) < 0.01 and abs(lengths.std() - 0.25) < 0.01
    p = params("sparkles")
    assert p["center_row"].shape == (n, 5)
    assert _uniform_span(p["center_row"], 0, h) and _uniform_span(p["center_col"], 0, w)
    assert p["rays"].min() == 50 and p["rays"].max() == 199
    assert np.allclose(p["radius"], 0.1 * s / 10 * size)
    lengths = p["ray_lengths"] / p["radius"][:, None, None]
    assert p["ray_lengths"].min() >= 1  # max(1, radius (1 + 0.25 N(0, 1)))
    assert abs(lengths.mean() - 1) < 0.01 and abs(lengths.std() - 0.25) < 0.01
    p = params("cocentric_sine_waves")
    assert _uniform_span(p["center_row"], 0, h) and _uniform_span(p["center_col"], 0, w)
    assert _uniform_span(p["freq"], 0, 10) and _uniform_span(p["amplitude"], 0, size / 10)
    assert _uniform_span(p["ring_width"], 0, size / 10) and np.all(p["intensity"] == 128 * s / 10)
    p = params("single_frequency_greyscale")
    big = np.maximum(np.abs(p["freq_col"]), np.abs(p["freq_row"]))
    assert _uniform_span(big, 0, math.pi) and _uniform_span(p["phase"], 0, two_pi)
    assert 0.4 < np.mean(np.abs(p["freq_col"]) >= np.abs(p["freq_row"])) < 0.6  # order shuffled
    assert np.allclose(p["intensity"], 196 * s / 10)
    assert np.allclose(params("perlin_noise")["alpha"], 0.5 * s / 10)
    assert np.allclose(params("blue_noise_sample")["threshold"], 3 * s / 10 - 2.5)
    assert np.allclose(params("brownish_noise")["intensity"], 64 * s / 10)


SEVERITY_0_IDENTITY = ["lines", "plasma", "checkerboard", "waterdrop", "caustic_refraction",
                       "perlin_noise", "cocentric_sine_waves", "single_frequency_greyscale",
                       "brownish_noise"]


@pytest.mark.parametrize("name", SEVERITY_0_IDENTITY)
def test_severity_0_is_identity(name):
    x = images_u8(3, 40, 57, seed=2)
    assert torch.equal(corrupt(x, name, 0.0, seed=5, keys=[1, 2, 3]), x)
    # Floating point: the warps resample at the pixel positions through grid_sample's [-1, 1]
    # normalisation, which float32 does not round-trip exactly (~1e-3 of a level).
    xf = x.float() / 255
    torch.testing.assert_close(corrupt(xf, name, 0, seed=5), xf, atol=2e-5, rtol=0)


def test_severity_0_sparkles_still_brightens():
    """Reference quirk: radius 0 skips the length term, so each star's weight is the angular fraction
    f in [0, 1) and five stars leave a black image at about 255 (1 - 1/32) on average."""
    black = torch.zeros(4, 3, 48, 48, dtype=torch.uint8)
    out = corrupt(black, "sparkles", 0.0, keys=[0, 1, 2, 3])
    assert out.float().mean() > 200
    x = images_u8(4, 48, 48, seed=4)
    assert (corrupt(x, "sparkles", 0.0) >= x).all()
    assert corruption_parameters("sparkles", 0.0, 48, 48, keys=[0], seed=0)["radius"].item() == 0


def test_severity_0_inverse_sparkles_whitens_a_quarter():
    """Exponent 0: weight clip(1 - (f - 0.5)^2) in [0.75, 1], so out = 255 + w (img - 255) moves a black
    pixel up to 255 / 4 and never darkens."""
    black = torch.zeros(4, 3, 48, 48, dtype=torch.uint8)
    out = corrupt(black, "inverse_sparkles", 0.0, keys=[0, 1, 2, 3])
    assert out.max() <= 64 and out.max() >= 60
    assert (out > 0).float().mean() > 0.8
    x = images_u8(4, 48, 48, seed=4)
    assert (corrupt(x, "inverse_sparkles", 0.0) >= x).all()


def test_severity_0_blue_noise_blacks_the_lowest_tail():
    """Threshold 3 * 0 - 2.5 on unit-variance, nearly Gaussian noise: P(z <= -2.5) ~ 0.6 % of the pixels
    turn black (all three channels), the rest are untouched."""
    x = images_u8(4, 224, 224, seed=9).clamp_(min=1)
    out = corrupt(x, "blue_noise_sample", 0.0, keys=[0, 1, 2, 3])
    black = (out == 0).all(dim=1)
    assert torch.equal(black, (out != x).any(dim=1))
    fraction = black.double().mean().item()
    assert 0.003 < fraction < 0.012, fraction


# ------------------------------------------------------------------------------------------------
# 3. Determinism
# ------------------------------------------------------------------------------------------------


def _digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


_SUBPROCESS = """
import hashlib, torch
from divfast.corruptions import corrupt, list_corruptions
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (2, 3, 24, 31), dtype=torch.uint8, generator=g)
for name in list_corruptions():
    out = corrupt(x, name, 4.0, seed=9, keys=[3, "a/b.JPEG"])
    print(name, hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest())
"""


def test_same_seed_same_bytes_here_and_in_a_fresh_process():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 24, 31), dtype=torch.uint8, generator=g)
    here = {}
    for name in NAMES:
        first = corrupt(x, name, 4.0, seed=9, keys=[3, "a/b.JPEG"])
        assert torch.equal(first, corrupt(x, name, 4.0, seed=9, keys=[3, "a/b.JPEG"]))
        here[name] = _digest(first)
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True)
    there = dict(line.split() for line in result.stdout.strip().splitlines())
    assert there == here


def _params_differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_other_key_or_seed_gives_other_parameters(name):
    base = corruption_parameters(name, 4.0, 32, 32, keys=[0], seed=0)
    assert not _params_differ(base, corruption_parameters(name, 4.0, 32, 32, keys=[0], seed=0))
    assert _params_differ(base, corruption_parameters(name, 4.0, 32, 32, keys=[1], seed=0))
    assert _params_differ(base, corruption_parameters(name, 4.0, 32, 32, keys=[0], seed=1))
    assert _params_differ(base, corruption_parameters(name, 4.0, 32, 32, keys=["0"], seed=0))
    # The per-image rows of a batch are the images' own parameters.
    batch = corruption_parameters(name, 4.0, 32, 32, keys=[5, 0], seed=0)
    assert all(torch.equal(batch[k][1], base[k][0]) for k in base)


@pytest.mark.parametrize("name", NAMES)
def test_output_does_not_depend_on_the_batch(name):
    """A batch of 5 with keys 7..11 against each image alone with its key: identical bytes, for uint8
    and float input (float output is not quantised, so it shows any difference)."""
    keys = [7, 8, 9, 10, 11]
    for h, w in [(40, 57), (33, 47), (64, 64)]:
        x8 = images_u8(5, h, w, seed=5)
        for x in (x8, x8.float() / 255):
            for seed in range(2):
                batch = corrupt(x, name, 4.0, seed=seed, keys=keys)
                alone = torch.cat([corrupt(x[i:i + 1], name, 4.0, seed=seed, keys=[k])
                                   for i, k in enumerate(keys)])
                assert torch.equal(batch, alone), (h, w, x.dtype, seed, int((batch != alone).sum()))


@pytest.mark.parametrize("name", NAMES)
def test_float_and_uint8_paths_agree(name):
    x = images_u8(3, 32, 45, seed=6)
    out8 = corrupt(x, name, 4.0, seed=2).double()
    for dtype in (torch.float32, torch.float64):
        outf = corrupt(x.to(dtype) / 255, name, 4.0, seed=2)
        assert outf.dtype == dtype
        # k / 255 * 255 is k up to a float32 ulp, so a value at .5 may round the other way.
        assert (outf.double() * 255 - out8).abs().max() <= 0.5 + 2e-3


@pytest.mark.parametrize("name", NAMES)
def test_severity_spellings_give_the_same_images(name):
    x = images_u8(2, 24, 24, seed=1)
    out = corrupt(x, name, 4.0)
    assert torch.equal(out, corrupt(x, name, 4))
    assert torch.equal(out, corrupt(x, name, np.float32(4.0)))
    assert torch.equal(out, corrupt(x, name, torch.tensor(4.0)))


def test_aliases_give_the_canonical_output():
    aliases = corruption_aliases()
    assert {"plasma_noise": "plasma", "checkerboard_cutout": "checkerboard", "water_drop": "waterdrop",
            "concentric_sine_waves": "cocentric_sine_waves"}.items() <= aliases.items()
    assert set(aliases.values()) == set(NAMES)
    x = images_u8(2, 24, 30, seed=8)
    for alias, canonical in aliases.items():
        assert get_corruption(alias) is get_corruption(canonical)
        assert torch.equal(corrupt(x, alias, 4.0, seed=3), corrupt(x, canonical, 4.0, seed=3))
        assert _params_differ(corruption_parameters(alias, 4.0, 24, 30, [0], 3),
                              corruption_parameters(canonical, 4.0, 24, 30, [0], 3)) is False
    assert torch.equal(corrupt(x, " Water_Drop ", 7.0), corrupt(x, "waterdrop", 7.0))


def test_random_stream_is_pinned():
    """Golden values: every corrupted image is a function of these streams, so a change here silently
    changes every generated dataset. If this fails on purpose, bump random._SEED_VERSION, say so in the
    changelog, and paste the new constants."""
    assert derive_seed("lines", 1.6, 0, 0) == 8394947024765961879
    assert derive_seed("plasma", 4.0, 12345, 42) == 5458519654107378980
    path = "n01440764/ILSVRC2012_val_00000293.JPEG"
    assert derive_seed("waterdrop", 7.0, path, 0) == 10921527933678561112
    assert derive_seed("checkerboard", 4, 3, 0) == 13696909739316593997
    assert derive_seed("checkerboard", 4, 3, 0) == derive_seed("checkerboard", 4.0000001, 3, 0)
    assert derive_seed("checkerboard", 4, 3, 0) != derive_seed("checkerboard", 4, "3", 0)
    assert derive_seed("lines", 1.6, "a\\b.png", 0) == derive_seed("lines", 1.6, "a/b.png", 0)

    # Seed 0 is plain SplitMix64, whose published first outputs are 0xE220A8397B1DCDAF,
    # 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC; random() keeps their top 53 bits.
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    assert ImageRandom(0).random(4).tolist() == [(v >> 11) / 2.0 ** 53 for v in published]
    assert ImageRandom(0).random(4).tolist() == [0.8833108082136426, 0.43152799704850997,
                                                 0.026433771592597743, 0.9708819781538285]
    rng = ImageRandom(8394947024765961879)
    assert rng.random(4).tolist() == [0.9840888971051533, 0.2404667381147949, 0.5761329501670667,
                                      0.49726853223026524]
    assert rng.normal() == -0.7186839643213944
    assert rng.integers(0, 1000, size=3).tolist() == [711, 880, 311]
    # The oracles expand stored seeds with their own scalar SplitMix64: it must be this stream.
    for seed in (0, 1, 8394947024765961879, (1 << 63) - 1):
        assert oracle.splitmix_uniforms(seed, 7) == ImageRandom(seed).random(7).tolist()


def test_device_expansion_is_the_same_stream(device):
    """Bulk fields (spectral phases, Perlin tables) are expanded from a per-image seed on the images'
    device; the numbers must be the CPU stream's, bit for bit, on every device."""
    device_uniform = getattr(divfast_random, "device_uniform", None)
    if device_uniform is None:
        pytest.skip("divfast.corruptions.random has no device_uniform")
    seeds = [0, 1, 12345, 8394947024765961879, (1 << 63) - 1]
    got = device_uniform(torch.tensor(seeds), 1000, device).cpu()
    assert got.dtype == torch.float64 and got.shape == (5, 1000)
    for row, seed in zip(got, seeds):
        assert row.tolist() == ImageRandom(seed).random(1000).tolist()


# ------------------------------------------------------------------------------------------------
# 4. CPU vs CUDA (the `device` fixture: cpu always, cuda where present)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_device_matches_cpu(name, device):
    """Parameters are drawn on the CPU whatever the device (identical by construction); the outputs
    agree within one uint8 level on >= 99.9 % of the values (float32 maths differs across devices)."""
    params = corruption_parameters(name, 4.0, 48, 61, keys=[0, 1, 2], seed=1)
    assert all(v.device.type == "cpu" for v in params.values())
    x = images_u8(3, 48, 61, seed=12)
    want = corrupt(x, name, 4.0, seed=1, keys=[0, 1, 2])
    got = corrupt(x.to(device), name, 4.0, seed=1, keys=[0, 1, 2])
    assert got.device == x.to(device).device and got.dtype == torch.uint8 and got.shape == x.shape
    close = (got.cpu().int() - want.int()).abs() <= 1
    assert close.double().mean() >= 0.999, close.double().mean()
    xf = x.float() / 255
    gotf = corrupt(xf.to(device), name, 4.0, seed=1, keys=[0, 1, 2]).cpu()
    wantf = corrupt(xf, name, 4.0, seed=1, keys=[0, 1, 2])
    assert ((gotf - wantf).abs() <= 1 / 255 + 1e-6).double().mean() >= 0.999


# ------------------------------------------------------------------------------------------------
# 5. Coverage: dtypes, sizes, severities, empty batches, non-contiguous input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_dtype_size_and_severity(name):
    for h, w in [(32, 32), (224, 224), (40, 57)]:
        x8 = images_u8(1, h, w, seed=h + w)
        xf = x8.double() / 255
        xf[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
        for x in (x8, xf.float(), xf):
            for severity in (0, 1.6, 4, 10):
                out = corrupt(x, name, severity, seed=4)
                assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
                if x.is_floating_point():
                    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
                if severity == 10:
                    assert not torch.equal(out, x), (name, h, w, x.dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_empty_batch(dtype):
    x = torch.zeros(0, 3, 32, 40, dtype=dtype)
    for name in NAMES:
        out = corrupt(x, name, 4.0, keys=[])
        assert out.shape == (0, 3, 32, 40) and out.dtype == dtype
    assert corruption_parameters("lines", 4.0, 32, 40, keys=[]) == {}


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_input(name):
    x = images_u8(2, 36, 44, seed=13)
    want = corrupt(x, name, 4.0, seed=1)
    wide = torch.zeros(2, 3, 36, 88, dtype=torch.uint8)
    wide[..., ::2] = x
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    views = [x.contiguous(memory_format=torch.channels_last), wide[..., ::2], transposed]
    for view in views:
        assert torch.equal(view, x)
        assert torch.equal(corrupt(view, name, 4.0, seed=1), want)
    xf = x.float() / 255
    assert torch.equal(corrupt(xf.contiguous(memory_format=torch.channels_last), name, 4.0, seed=1),
                       corrupt(xf, name, 4.0, seed=1))


# ------------------------------------------------------------------------------------------------
# 6. Bad input
# ------------------------------------------------------------------------------------------------

GOOD = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)


def test_unknown_corruption_lists_the_valid_names():
    with pytest.raises(DivfastError, match="corruption") as info:
        corrupt(GOOD, "fog", 4.0)
    for name in NAMES:
        assert name in str(info.value)
    assert "plasma_noise" in str(info.value)
    with pytest.raises(DivfastError, match="corruption"):
        corruption_parameters("fog", 4.0, 16, 16, keys=[0])
    with pytest.raises(DivfastError, match="corruption"):
        get_corruption(3)
    assert issubclass(DivfastError, ValueError)


@pytest.mark.parametrize("severity", [-0.1, 10.01, 11, float("nan"), float("inf"), "high", "4", True,
                                      None, [4.0], torch.tensor([4.0, 5.0])])
def test_bad_severity(severity):
    with pytest.raises(DivfastError, match="severity"):
        corrupt(GOOD, "lines", severity)
    with pytest.raises(DivfastError, match="severity"):
        corruption_parameters("lines", severity, 16, 16, keys=[0])


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_bad_seed(seed):
    with pytest.raises(DivfastError, match="seed"):
        corrupt(GOOD, "lines", 4.0, seed=seed)
    with pytest.raises(DivfastError, match="seed"):
        corruption_parameters("lines", 4.0, 16, 16, keys=[0], seed=seed)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 2, 3, 16, 16), (2, 1, 16, 16), (2, 4, 16, 16),
                                   (2, 16, 16, 3)])
def test_bad_shape(shape):
    with pytest.raises(DivfastError, match="images"):
        corrupt(torch.zeros(shape, dtype=torch.uint8), "lines", 4.0)


@pytest.mark.parametrize("shape", [(1, 3, 7, 16), (1, 3, 16, 7), (1, 3, 1, 1)])
def test_too_small(shape):
    with pytest.raises(DivfastError, match="images.*8"):
        corrupt(torch.zeros(shape, dtype=torch.uint8), "plasma", 4.0)
    corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "plasma", 4.0)  # 8 px is enough


@pytest.mark.parametrize("value", [-0.01, 1.01, 255.0, float("nan"), float("inf")])
def test_float_outside_unit_range(value):
    x = torch.rand(2, 3, 16, 16)
    x[1, 2, 3, 4] = value
    with pytest.raises(DivfastError, match="images.*\\[0, 1\\]"):
        corrupt(x, "lines", 4.0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.bool])
def test_integer_dtype_other_than_uint8(dtype):
    with pytest.raises(DivfastError, match="images.*uint8"):
        corrupt(torch.zeros(2, 3, 16, 16, dtype=dtype), "lines", 4.0)


def test_not_a_tensor():
    with pytest.raises(DivfastError, match="images"):
        corrupt(np.zeros((2, 3, 16, 16), dtype=np.uint8), "lines", 4.0)


@pytest.mark.parametrize("keys", [[0], [0, 1, 2], []])
def test_keys_of_the_wrong_length(keys):
    with pytest.raises(DivfastError, match="keys"):
        corrupt(GOOD, "lines", 4.0, keys=keys)
    corrupt(GOOD, "lines", 4.0, keys=torch.tensor([4, 5]))  # a tensor of indices is fine


@pytest.mark.parametrize("keys", [[0.5, 1.5], [True, False], [None, None]])
def test_keys_of_the_wrong_type(keys):
    with pytest.raises(DivfastError, match="keys"):
        corrupt(GOOD, "lines", 4.0, keys=keys)


@pytest.mark.parametrize("spec, expected", [
    ("lines1.6", ("lines", 1.6)), ("plasma_noise4.75", ("plasma", 4.75)),
    ("waterdrop7", ("waterdrop", 7.0)), ("clean", ("clean", 0.0)),
    ("checkerboard-4.0", ("checkerboard", 4.0)), ("water_drop10", ("waterdrop", 10.0)),
    ("LINES_0.5", ("lines", 0.5)), ("blue_noise_sample.8", ("blue_noise_sample", 0.8)),
    ("concentric_sine_waves3", ("cocentric_sine_waves", 3.0)), ("perlin_noise0", ("perlin_noise", 0.0)),
])
def test_parse_good_specs(spec, expected):
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize("spec", ["lines", "foo1.0", "lines11", "", "1.6", "lines1.6x", "lines-1.6.2",
                                  "lines 1.6", "plasma10.5", "lines1e-1"])
def test_parse_bad_specs(spec):
    with pytest.raises(DivfastError, match="--dataset"):
        parse_dataset_spec(spec)


def test_parse_bad_spec_messages():
    with pytest.raises(DivfastError, match="lines11.*severity.*\\[0, 10\\]"):
        parse_dataset_spec("lines11")
    with pytest.raises(DivfastError, match="'foo1.0'.*lines") as info:
        parse_dataset_spec("foo1.0")
    assert all(name in str(info.value) for name in NAMES)
    with pytest.raises(DivfastError, match="--dataset"):
        parse_dataset_spec(1.6)


def test_format_dataset_spec_round_trips():
    assert format_dataset_spec("plasma", 4) == "plasma4.0"
    assert format_dataset_spec("lines", 1.6) == "lines1.6"
    assert format_dataset_spec("water_drop", 7) == "waterdrop7.0"
    assert format_dataset_spec("plasma_noise", 4.75) == "plasma4.75"
    assert format_dataset_spec("clean", 0) == "clean"
    assert format_dataset_spec("lines", 10) == "lines10.0"
    # Every severity of the reference's imagenet_c_bar.csv survives format -> parse.
    table = {"caustic_refraction": (2.35, 3.2, 4.9, 6.6, 9.15), "inverse_sparkles": (1, 2, 4, 9, 10),
             "sparkles": (1, 2, 3, 5, 6), "perlin_noise": (4.6, 5.2, 5.8, 7.6, 8.8),
             "blue_noise_sample": (0.8, 1.6, 2.4, 4.0, 5.6), "plasma": (4.75, 7, 8.5, 9.25, 10),
             "checkerboard": (2, 3, 4, 5, 6), "cocentric_sine_waves": (3, 5, 8, 9, 10),
             "single_frequency_greyscale": (1, 1.5, 2, 4.5, 5), "brownish_noise": (1, 2, 3, 4, 5),
             "lines": (1.6,), "waterdrop": (7.0,)}
    for name, severities in table.items():
        for s in severities:
            assert parse_dataset_spec(format_dataset_spec(name, s)) == (name, float(s))
    with pytest.raises(DivfastError, match="corruption"):
        format_dataset_spec("fog", 1.0)


def test_canonical_spec_regenerates_the_same_images():
    x = images_u8(2, 24, 24, seed=3)
    spec = format_dataset_spec("plasma", 1.23456)
    original = corrupt(x, "plasma", 1.23456, seed=0)
    assert torch.equal(corrupt(x, *parse_dataset_spec(spec), seed=0), original)


@pytest.mark.parametrize("severity", [11, -1, float("nan")])
def test_format_dataset_spec_rejects_bad_severity(severity):
    with pytest.raises(DivfastError, match="severity"):
        format_dataset_spec("lines", severity)


@pytest.mark.parametrize("name", ["perlin_noise", "caustic_refraction"])
def test_reduced_precision_matmul_settings_keep_exact_results(name):
    """The matrix-product corruptions must not crash nor change under TF32/bfloat16 settings: the
    legacy getter raises once the fp32_precision API is used, and both mean "reduced"."""
    x = images_u8(2, 24, 28, seed=4)
    expected = corrupt(x, name, 6.0, seed=2)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(corrupt(x, name, 6.0, seed=2), expected)
    finally:
        torch.set_float32_matmul_precision(before)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:
        pytest.skip("this torch has no fp32_precision API")
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert torch.equal(corrupt(x, name, 6.0, seed=2), expected)
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.set_float32_matmul_precision(before)
