"""Per-image random streams: the same parameters for an image on every machine, device and worker count.

Each image gets a 64-bit seed hashed (BLAKE2b) from ``(corruption, severity, key, user seed)``, where
the key is the image's index in its dataset or its path relative to the dataset root. The seed drives a
counter-based SplitMix64 stream evaluated with NumPy on the CPU. The stream is our own code, so its
numbers do not change with NumPy or torch versions, and it never touches torch's global generator or a
CUDA generator: CPU and GPU runs draw identical parameters, in any order and in any process.

Bulk random fields (the spectral phases, the Perlin tables: up to 10^5 numbers per image) are not
drawn on the CPU. Like the reference's own ``seed`` parameters, the image's stream draws one 63-bit
seed, and :func:`device_uniform` expands it on the images' device with the same SplitMix64 stream in
torch integer arithmetic. Integer arithmetic is exact, so CPU and GPU expand identical numbers.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1
_GOLDEN_INT, _MIX1_INT, _MIX2_INT = int(_GOLDEN), int(_MIX1), int(_MIX2)
_SEED_VERSION = "divfast.corruptions/1"  # bump only with a documented change of every image


def derive_seed(corruption: str, severity: float, key: int | str, seed: int) -> int:
    """The 64-bit seed of one image: a hash of its corruption, severity, key and the user's seed.

    ``severity`` enters with six decimals, so ``4``, ``4.0`` and ``4.0000001`` name the same images;
    an integer key (dataset index) and a string key (relative path) never collide.
    """
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, str)):
        raise TypeError(f"`keys`: expected int indices or str paths, got {type(key).__name__}")
    key_text = f"i{int(key)}" if not isinstance(key, str) else "p" + key.replace("\\", "/")
    text = f"{_SEED_VERSION}|{corruption}|{float(severity):.6f}|{key_text}|{int(seed)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class ImageRandom:
    """A reproducible stream of random numbers for one image (SplitMix64 over a counter).

    Draws are float64 NumPy arrays; a draw of ``size=None`` returns a Python float or int. Every call
    advances the counter by the number of values drawn, so the parameters of a corruption are a pure
    function of the seed and of the order of its draws.
    """

    def __init__(self, seed: int):
        self._key_int = int(seed) & _MASK
        self._key = np.uint64(self._key_int)
        self._counter = 0

    def _scalar_bits(self) -> int:
        """One draw in plain Python integers: the same value as ``_bits(1)``, ~10x cheaper."""
        self._counter += 1
        z = (self._key_int + self._counter * _GOLDEN_INT) & _MASK
        z = ((z ^ (z >> 30)) * _MIX1_INT) & _MASK
        z = ((z ^ (z >> 27)) * _MIX2_INT) & _MASK
        return z ^ (z >> 31)

    def _bits(self, n: int) -> np.ndarray:
        idx = np.arange(self._counter + 1, self._counter + n + 1, dtype=np.uint64)
        self._counter += n
        with np.errstate(over="ignore"):
            return _splitmix(self._key + idx * _GOLDEN)

    def seed(self) -> int:
        """A 63-bit integer: the seed of a bulk field expanded by :func:`device_uniform`."""
        return self._scalar_bits() >> 1

    def random(self, size=None):
        """Uniform floats in [0, 1) with 53 random bits."""
        if size is None:
            return (self._scalar_bits() >> 11) * (1.0 / 9007199254740992.0)
        n = int(np.prod(size))
        u = (self._bits(n) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
        return u.reshape(size)

    def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
        """Uniform floats in [low, high)."""
        u = self.random(size)
        return low + (high - low) * u

    def integers(self, low: int, high: int, size=None):
        """Integers in [low, high) (high exclusive, like NumPy); bias below 2**-40 for spans < 2**13."""
        if high <= low:
            raise ValueError(f"integers: expected low < high, got [{low}, {high})")
        u = self.random(size)
        if size is None:
            return min(math.floor(low + (high - low) * u), high - 1)
        return np.minimum(np.floor(low + (high - low) * u), high - 1).astype(np.int64)

    def normal(self, size=None):
        """Standard normal floats (Box-Muller; two uniforms per value)."""
        n = 1 if size is None else int(np.prod(size))
        u1 = 1.0 - self.random(n)  # (0, 1]: log is finite
        u2 = self.random(n)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
        return float(z[0]) if size is None else z.reshape(size)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic on signed ints)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def device_uniform(seeds: torch.Tensor, count: int, device=None) -> torch.Tensor:
    """``ImageRandom(seed).random(count)`` for every seed at once, on ``device``: (B, count) float64.

    Bit-identical to the NumPy stream on any device (int64 multiplication wraps modulo 2**64 like
    uint64). Used for bulk fields, so no per-image loop and no host-to-device copy of the numbers.
    """
    device = seeds.device if device is None else device
    key = seeds.to(device=device, dtype=torch.int64).view(-1, 1)
    z = torch.arange(1, count + 1, device=device, dtype=torch.int64).view(1, -1) * _signed(int(_GOLDEN))
    z = z + key  # (B, count)
    z ^= _shift_right(z, 30)
    z *= _signed(int(_MIX1))
    z ^= _shift_right(z, 27)
    z *= _signed(int(_MIX2))
    z ^= _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * (1.0 / 9007199254740992.0)
