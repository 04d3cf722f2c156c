"""Slow, scalar, per-pixel reference implementations of the twelve ImageNet-C-bar corruptions.

Written from the formulas of the reference (facebookresearch/augmentation-corruption,
``imagenet_c_bar/corrupt.py``, ``utils/image.py``, ``utils/perlin_noise.py``), one pixel at a time in
float64 Python, so that each can be checked by reading it next to the reference. Randomness is not
re-drawn: every oracle takes the parameter dict that ``corruption_parameters`` returns for one image
(see :func:`image_params`), so the oracle and divfast see the same draws.

The oracles include divfast's documented deliberate differences from the reference:

* images may be non-square: positions scale with each axis, lengths with the smaller side, and the
  spectral noises use each axis's own centre and half-size;
* checkerboard: ``floor`` for the cell index and a grid offset by half its side (no truncation toward
  zero, no wrapping of negative indices);
* lines: exact float segments (no truncation of the end points to integers) and float blending (no
  uint8 truncation after each line); each line covers, per major-axis step, the pixels whose
  minor-axis distance to it is below one, weighted by one minus their perpendicular distance
  (scikit-image's ``line_aa`` weights for an untruncated segment);
* no clipping or uint8 conversion here: every oracle returns the float image before clipping, which is
  what ``Corruption.apply`` returns.

Images are ``(H, W, 3)`` float64 arrays on the 0-255 scale, row ``r`` and column ``c`` at integer
positions, the reference's ``point = [y, x]`` = ``(row, col)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

GREY = 128.0
WHITE = 255.0


def image_params(params: dict, index: int) -> dict:
    """One image's entry of ``corruption_parameters(...)``: NumPy arrays, 0-d ones as Python scalars."""
    out = {}
    for key, value in params.items():
        item = value[index].cpu().numpy()
        out[key] = item.item() if item.ndim == 0 else item
    return out


_MASK = (1 << 64) - 1


def splitmix_uniforms(seed: int, count: int) -> list[float]:
    """``ImageRandom(seed).random(count)`` one number at a time in Python integers: SplitMix64 over
    the counter 1, 2, ..., keeping the top 53 bits. Used to expand the seeds that some corruptions
    store instead of bulk tables (divfast expands them on the images' device)."""
    out = []
    for i in range(1, count + 1):
        z = (seed + i * 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        out.append((z >> 11) / 9007199254740992.0)
    return out


def bilinear(image: np.ndarray, row: float, col: float) -> np.ndarray:
    """The reference's ``bilinear_interpolation``: the four neighbours around (row, col), each one that
    lies outside the image counting as black."""
    h, w, _ = image.shape
    r0, c0 = math.floor(row), math.floor(col)
    fr, fc = row - r0, col - c0

    def at(r, c):
        return image[r, c] if 0 <= r < h and 0 <= c < w else np.zeros(3)

    top = at(r0, c0) * (1.0 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1.0 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1.0 - fr) + bottom * fr


# --------------------------------------------------------------------------------------------------
# Masks: lines, checkerboard


def lines(image, p):
    """Lines through (row_k, col_k) with direction (cos a_k, sin a_k) in (row, col), ``half_length``
    either way; each blended toward grey in turn, ``v <- (1 - w) v + 128 w`` (the reference's order)."""
    h, w, _ = image.shape
    out = image.copy()
    half = p["half_length"]
    for row0, col0, angle in zip(p["row"], p["col"], p["angle"]):
        dr, dc = math.cos(angle), math.sin(angle)
        row_major = abs(dr) >= abs(dc)
        major_cos = max(abs(dr), abs(dc))  # cos of the angle between the line and its major axis
        for r in range(h):
            for c in range(w):
                along_major = (r - row0) if row_major else (c - col0)
                if abs(along_major) > half * major_cos:  # beyond the segment's end on the major axis
                    continue
                perpendicular = abs((r - row0) * dc - (c - col0) * dr)  # |cross(direction, p - p0)|
                if perpendicular / major_cos >= 1.0:  # minor-axis distance: not one of the two pixels
                    continue
                weight = 1.0 - perpendicular
                out[r, c] = (1.0 - weight) * out[r, c] + weight * GREY
    return out


def checkerboard(image, p):
    """A pixel rotated by ``angle`` and divided by the cell size falls in cell (kx, ky); it turns grey
    when kx + ky is even (the reference's ``int(nx % 2) == int(ny % 2)``) and the cell is on."""
    h, w, _ = image.shape
    out = image.copy()
    grid = p["grid"]
    g = grid.shape[0] // 2
    cos_a, sin_a = math.cos(p["angle"]), math.sin(p["angle"])
    for r in range(h):
        for c in range(w):
            nx = (cos_a * r + sin_a * c) / p["scale"]
            ny = (-sin_a * r + cos_a * c) / p["scale"]
            kx, ky = math.floor(nx), math.floor(ny)
            if (kx % 2) == (ky % 2) and grid[kx + g, ky + g]:
                out[r, c] = GREY
    return out


# --------------------------------------------------------------------------------------------------
# Procedural noise: plasma, Perlin, concentric sine waves, single frequency


def plasma(image, p):
    h, w, _ = image.shape
    t, scale, sharp, iters = p["time"], p["scale"], p["sharpness"], int(p["iterations"])
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            x, y = c / scale, r / scale  # the reference's kernel(x, y): x is the column
            i = [1.0, 1.0, 1.0, 0.0]
            for _ in range(iters):
                r0 = math.cos(y * i[0] - i[3] + t / i[1]) / i[2]
                r1 = math.sin(x * i[0] - i[3] + t / i[1]) / i[2]
                r0, r1 = r0 - 0.3 * r1, r1 + 0.3 * r0  # r += [-r1, r0] * 0.3
                x += r0
                y += r1
                i = [i[0] * 1.93, i[1] * 1.15, i[2] * (2.25 - sharp), i[3] * t * i[1]]
            noise = np.array([math.sin(x - t), math.sin((x + y + math.sin(t)) * 0.5), math.sin(y + t)])
            out[r, c] = (1.0 - p["intensity"] / 255.0) * image[r, c] + p["intensity"] * noise
    return out


def _perlin_scalar(perm, grads, x, y):
    """``PerlinNoiseGenerator.noise(x, y)`` with the tables ``perm`` (514,) and ``grads`` (514, 2)."""
    n = 16 * 256
    t = x + n
    bx0 = int(t) % 256
    bx1 = (bx0 + 1) % 256
    rx0 = t % 1.0
    rx1 = rx0 - 1.0
    t = y + n
    by0 = int(t) % 256
    by1 = (by0 + 1) % 256
    ry0 = t % 1.0
    ry1 = ry0 - 1.0
    i, j = perm[bx0], perm[bx1]
    b00, b10, b01, b11 = perm[i + by0], perm[j + by0], perm[i + by1], perm[j + by1]
    sx = rx0 * rx0 * (3.0 - 2.0 * rx0)
    sy = ry0 * ry0 * (3.0 - 2.0 * ry0)
    u = rx0 * grads[b00, 0] + ry0 * grads[b00, 1]
    v = rx1 * grads[b10, 0] + ry0 * grads[b10, 1]
    a = u + sx * (v - u)
    u = rx0 * grads[b01, 0] + ry1 * grads[b01, 1]
    v = rx1 * grads[b11, 0] + ry1 * grads[b11, 1]
    b = u + sx * (v - u)
    return 1.5 * (a + sy * (b - a))


def perlin_tables(p) -> tuple[list[int], np.ndarray]:
    """The permutation (514,) and unit gradients (514, 2) of one image, laid out as the reference's
    ``PerlinNoiseGenerator`` leaves them (entries 256..513 repeat 0..257).

    Either given in the parameters (``perm``, ``grads``), or expanded from ``table_seed`` as divfast
    documents it: 768 uniforms u; gradient k = ((floor(512 u[2k]), floor(512 u[2k+1])) - 256) / 256
    normalised (a zero vector becomes (1, 0)); the permutation sorts u[512:768] (stable), a uniformly
    random order where the reference's swap loop is biased.
    """
    if "perm" in p:
        return [int(v) for v in p["perm"]], np.asarray(p["grads"], dtype=np.float64)
    u = splitmix_uniforms(int(p["table_seed"]), 768)
    grads = []
    for k in range(256):
        gx = (min(math.floor(u[2 * k] * 512.0), 511) - 256) / 256.0
        gy = (min(math.floor(u[2 * k + 1] * 512.0), 511) - 256) / 256.0
        norm = math.hypot(gx, gy)
        grads.append((gx / norm, gy / norm) if norm > 0 else (1.0, 0.0))
    perm = sorted(range(256), key=lambda i: (u[512 + i], i))
    return perm + perm + perm[:2], np.array(grads + grads + grads[:2])


def perlin_noise(image, p):
    h, w, _ = image.shape
    period = 32.0 * min(h, w) / 224.0  # the reference's m = I / (32 * size / 224)
    perm, grads = perlin_tables(p)
    alpha = p["alpha"]
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            x, y = r / period, c / period  # point = [y, x] @ m: the first coordinate is the row
            turbulence, octave = 0.0, 1.0
            while octave <= 16.0:
                turbulence += abs(_perlin_scalar(perm, grads, octave * x, octave * y)) / octave
                octave *= 2.0
            f = min(max(0.5 * turbulence + 0.5, 0.0), 1.0)
            out[r, c] = (1.0 - alpha) * image[r, c] + 255.0 * alpha * f
    return out


def cocentric_sine_waves(image, p):
    h, w, _ = image.shape
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            dx, dy = c - p["center_col"], r - p["center_row"]  # the reference's x - x0, y - y0
            angle = math.atan2(dx, dy) * p["freq"]
            radius = math.sqrt(dx * dx + dy * dy) + math.sin(angle) * p["amplitude"]
            noise = (radius % p["ring_width"]) / p["ring_width"] - 0.5
            out[r, c] = image[r, c] + p["intensity"] * noise
    return out


def single_frequency_greyscale(image, p):
    h, w, _ = image.shape
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            noise = math.sin(c * p["freq_col"] + r * p["freq_row"] + p["phase"])
            out[r, c] = image[r, c] + p["intensity"] * noise
    return out


# --------------------------------------------------------------------------------------------------
# Warps: water drop, caustic refraction


def waterdrop(image, p):
    h, w, _ = image.shape
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            dr, dc = r - p["center_row"], c - p["center_col"]
            dist = math.hypot(dr, dc)
            if dist > p["radius"]:
                src = (r, c)
            else:
                amount = p["amplitude"] * math.sin(dist / p["wavelength"] * 2.0 * math.pi - p["phase"])
                if dist != 0.0:
                    amount *= p["wavelength"] / dist
                src = (r + amount * dr, c + amount * dc)
            out[r, c] = bilinear(image, *src)
    return out


def waterdrop_source(p, r: int, c: int) -> tuple[float, float]:
    """Where the water drop makes pixel (r, c) sample the input."""
    dr, dc = r - p["center_row"], c - p["center_col"]
    dist = math.hypot(dr, dc)
    if dist > p["radius"]:
        return float(r), float(c)
    amount = p["amplitude"] * math.sin(dist / p["wavelength"] * 2.0 * math.pi - p["phase"])
    if dist != 0.0:
        amount *= p["wavelength"] / dist
    return r + amount * dr, c + amount * dc


def caustic_pattern(time: float, size: float, height: int, width: int) -> np.ndarray:
    """The reference's ``caustic_noise_kernel`` at every pixel (one channel; its three are equal)."""
    field = np.empty((height, width))
    for r in range(height):
        for c in range(width):
            p = [(r / size) % 1.0 * 6.28318530718 - 250.0, (c / size) % 1.0 * 6.28318530718 - 250.0]
            i = list(p)
            col, inten = 1.0, 0.005
            for n in range(5):
                t = time * (1.0 - 3.5 / (n + 1))
                i = [p[0] + math.cos(t - i[0]) + math.sin(t + i[1]),
                     p[1] + math.sin(t - i[1]) + math.cos(t + i[0])]
                length = math.sqrt((p[0] / (math.sin(i[0] + t) / inten)) ** 2
                                   + (p[1] / (math.cos(i[1] + t) / inten)) ** 2)
                col += 1.0 / length
            col /= 5.0
            col = 1.17 - col ** 1.4
            field[r, c] = min(max(abs(col) ** 8.0, 0.0), 1.0)
    return field


def refract(incident: np.ndarray, normal: np.ndarray, eta: float) -> np.ndarray:
    """The reference's ``refract``, the long way: angles by acos/asin, the frame (normal, orthogonal,
    spectator) by cross products, and the inverse of its rotation matrix."""
    if abs(float(np.dot(incident, normal))) >= 1.0 - 1e-3:
        return incident
    angle = math.acos(float(np.dot(incident, normal)))
    out_angle = math.asin(math.sin(angle) / eta)
    out_unrotated = np.array([math.cos(out_angle), math.sin(out_angle), 0.0])
    spectator = np.cross(incident, normal)
    spectator = spectator / np.linalg.norm(spectator)
    orthogonal = np.cross(normal, spectator)
    rotation = np.stack((normal, orthogonal, spectator), axis=0)
    return np.linalg.inv(rotation) @ out_unrotated


def _caustic_lumas(p, h, w):
    """The blurred caustic field's (north, south, west, east) lumas at every pixel, (H, W, 4)."""
    # scipy on the (H, W) field; the reference blurs an (H, W, 3) array whose channels are equal, and
    # its reflect-mode blur along the channel axis leaves equal channels unchanged.
    field = gaussian_filter(caustic_pattern(p["time"], p["size"], h, w), sigma=1.0, mode="reflect")

    def luma(r, c):  # the reference's luma_at_offset: 0 outside the image
        return float(field[r, c]) if 0 <= r < h and 0 <= c < w else 0.0

    return np.array([[[luma(r, c - 1), luma(r, c + 1), luma(r - 1, c), luma(r + 1, c)]
                      for c in range(w)] for r in range(h)])


def caustic_normal_z(p, height: int, width: int) -> np.ndarray:
    """The z component of the lens normal at every pixel (the reference's ``dot(incident, normal)``)."""
    lumas = _caustic_lumas(p, height, width)
    slope_row, slope_col = lumas[..., 3] - lumas[..., 2], lumas[..., 1] - lumas[..., 0]
    return 1.0 / np.sqrt(slope_row ** 2 + slope_col ** 2 + 1.0)


def caustic_refraction(image, p, eta: float = 4.0):
    h, w, _ = image.shape
    lumas = _caustic_lumas(p, h, w)
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            north, south, west, east = lumas[r, c]
            normal = np.array([east - west, south - north, 1.0])
            normal = normal / np.linalg.norm(normal)
            vector = np.round(refract(np.array([0.0, 0.0, 1.0]), normal, eta) * p["lens_scale"], 3)
            pixel = bilinear(image, r + vector[0], c + vector[1])
            pixel = pixel + 255.0 * (north - south) * p["lighting"]
            pixel = pixel + 255.0 * (east - west) * p["lighting"]
            out[r, c] = pixel
    return out


# --------------------------------------------------------------------------------------------------
# Stars: sparkles, inverse sparkles


def _star_weight(r, c, center_row, center_col, ray_lengths, radius, exponent):
    """The reference's sparkle ``kernel`` weight ``f`` at (r, c) for one star (before blending)."""
    rays = len(ray_lengths)
    dp = (r - center_row, c - center_col)
    dist = math.hypot(*dp)
    angle = math.atan2(dp[1], dp[0])
    d = (angle + math.pi) / (2.0 * math.pi) * rays
    i = int(d)
    f = d - i
    if radius != 0:
        length = ray_lengths[i % rays] + f * (ray_lengths[(i + 1) % rays] - ray_lengths[i % rays])
        g = (length ** 2 / (dist ** 2 + 1e-4)) ** exponent
        f = (1.0 - (f - 0.5) ** 2) * g
    return min(max(f, 0.0), 1.0)


def sparkles(image, p):
    """Five stars, each blended toward white in turn: ``v <- v + f (255 - v)``; exponent
    ``(100 - 50) / 50 = 1``."""
    h, w, _ = image.shape
    out = image.copy()
    for k in range(len(p["rays"])):
        lengths = p["ray_lengths"][k][: int(p["rays"][k])]
        for r in range(h):
            for c in range(w):
                f = _star_weight(r, c, p["center_row"][k], p["center_col"][k], lengths,
                                 p["radius"], 1.0)
                out[r, c] = out[r, c] + f * (WHITE - out[r, c])
    return out


def inverse_sparkles(image, p):
    """White, except a star-shaped window: ``255 + f (v - 255)``."""
    h, w, _ = image.shape
    lengths = p["ray_lengths"][: int(p["rays"])]
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            f = _star_weight(r, c, p["center_row"], p["center_col"], lengths, p["radius"],
                             p["exponent"])
            out[r, c] = WHITE + f * (image[r, c] - WHITE)
    return out


# --------------------------------------------------------------------------------------------------
# Spectral noise: blue noise sample, brownish noise


def full_phases(half: np.ndarray, centre: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference's phase array: the left half; for an odd width a centre column made of the
    drawn upper half, a 0 in the middle (odd height) and the upper half reversed; then
    ``half[::-1, ::-1]``."""
    parts = [half]
    if width % 2:
        column = list(centre)
        if height % 2:
            column.append(0.0)
        column += list(centre[::-1])
        parts.append(np.array(column).reshape(height, 1))
    parts.append(half[::-1, ::-1])
    return np.concatenate(parts, axis=1)


def spectral_field(half, centre, height, width, profile: str) -> np.ndarray:
    """One unit-std noise field with the reference's construction, via numpy.fft.ifft2."""
    power = np.empty((height, width))
    for r in range(height):
        for c in range(width):
            dist = math.hypot(c - width / 2.0, r - height / 2.0)  # norm([x, y] - center)
            power[r, c] = dist if profile == "blue" else 1.0 / (dist ** 2 + 1.0)
    phases = full_phases(half, centre, height, width)
    spectrum = power * (np.cos(phases) + 1j * np.sin(phases))
    spectrum = np.roll(spectrum, height // 2, axis=0)
    spectrum = np.roll(spectrum, width // 2, axis=1)
    noise = np.real(np.fft.ifft2(spectrum))
    return noise / np.std(noise)


def spectral_phases(p, count: int, height: int, width: int):
    """The drawn phases of ``count`` fields: the left halves (K, H, W//2) and, for odd widths, the
    upper halves of the centre columns (K, H//2). Either given in the parameters (``phase_half``,
    ``phase_centre``) or expanded from ``phase_seed`` as divfast documents it: per field, the left half
    in row-major order then the centre column, ``2 pi u`` from one stream of uniforms."""
    if "phase_half" in p:
        return np.asarray(p["phase_half"]), np.asarray(p["phase_centre"])
    n_half = height * (width // 2)
    n_centre = height // 2 if width % 2 else 0
    u = np.array(splitmix_uniforms(int(p["phase_seed"]), count * (n_half + n_centre)))
    phases = (u * 2.0 * math.pi).reshape(count, n_half + n_centre)
    return phases[:, :n_half].reshape(count, height, width // 2), phases[:, n_half:]


def blue_noise_sample(image, p):
    h, w, _ = image.shape
    half, centre = spectral_phases(p, 1, h, w)
    noise = spectral_field(half[0], centre[0], h, w, "blue")
    out = np.empty_like(image)
    for r in range(h):
        for c in range(w):
            out[r, c] = image[r, c] * (1.0 if noise[r, c] > p["threshold"] else 0.0)
    return out


def brownish_noise(image, p):
    h, w, _ = image.shape
    out = image.copy()
    half, centre = spectral_phases(p, 3, h, w)
    for k in range(3):  # an independent field per channel
        noise = spectral_field(half[k], centre[k], h, w, "brownish")
        out[:, :, k] = image[:, :, k] + p["intensity"] * noise
    return out


ORACLES = {
    "lines": lines,
    "plasma": plasma,
    "checkerboard": checkerboard,
    "waterdrop": waterdrop,
    "caustic_refraction": caustic_refraction,
    "inverse_sparkles": inverse_sparkles,
    "sparkles": sparkles,
    "perlin_noise": perlin_noise,
    "blue_noise_sample": blue_noise_sample,
    "cocentric_sine_waves": cocentric_sine_waves,
    "single_frequency_greyscale": single_frequency_greyscale,
    "brownish_noise": brownish_noise,
}
