"""The corruption registry, dataset specs (``"lines1.6"``) and :func:`corrupt`.

A corruption is two functions, split so that randomness never depends on the device:

* ``sample(rng, height, width, severity)`` draws one image's parameters from its own
  :class:`~divfast.corruptions.random.ImageRandom` stream on the CPU (the reference's
  ``sample_parameters``, with its distributions scaled to the image size);
* ``apply(images, params)`` transforms a batch ``(B, 3, H, W)`` float32 on the 0-255 scale with torch
  ops, every image with its own parameters, on whatever device the images live.

Severity is the reference's float 0-10 scale; ``s * max / 10`` maps it to each parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from divfast.corruptions.random import ImageRandom, derive_seed
from divfast.errors import DivfastError

MIN_IMAGE_SIZE = 8
CPU_CHUNK_PIXELS = 1 << 18  # ~5 images of 224 px per call: each float32 temporary ~1 MiB


class Corruption:
    """Base class: subclasses set ``name``, ``reference`` and implement ``sample`` and ``apply``."""

    name: str = ""
    reference: str = ""  # the name of the reference implementation (facebookresearch/augmentation-corruption)
    aliases: tuple[str, ...] = ()

    def sample(self, rng: ImageRandom, height: int, width: int, severity: float) -> dict:
        """One image's parameters: a dict of floats, ints and fixed-shape NumPy arrays."""
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``images`` (B, 3, H, W) float32 in [0, 255], ``params`` stacked per image (B, ...) on the
        images' device -> corrupted images (B, 3, H, W) float32, not yet clipped."""
        raise NotImplementedError


_REGISTRY: dict[str, Corruption] = {}
# The paper's four, then ImageNet-C-bar's others in the order of the reference's imagenet_c_bar.csv.
_ORDER = ("lines", "plasma", "checkerboard", "waterdrop", "caustic_refraction", "inverse_sparkles",
          "sparkles", "perlin_noise", "blue_noise_sample", "cocentric_sine_waves",
          "single_frequency_greyscale", "brownish_noise")
_ALIASES: dict[str, str] = {}


def register(cls: type[Corruption]) -> type[Corruption]:
    """Class decorator: adds one instance of ``cls`` under its name and aliases."""
    for key in (cls.name, *cls.aliases):
        if key in _ALIASES:
            raise RuntimeError(f"corruption name {key!r} registered twice")
        _ALIASES[key] = cls.name
    _REGISTRY[cls.name] = cls()
    return cls


def list_corruptions() -> list[str]:
    """Canonical corruption names: the paper's four first, then the rest of ImageNet-C-bar.

    Returns:
        ``["lines", "plasma", "checkerboard", "waterdrop", "caustic_refraction", ...]``; each is
        accepted by :func:`corrupt` and in a dataset spec (``"lines1.6"``).

    Example:
        >>> list_corruptions()[:4]
        ['lines', 'plasma', 'checkerboard', 'waterdrop']
    """
    rank = {name: i for i, name in enumerate(_ORDER)}
    return sorted(_REGISTRY, key=lambda name: (rank.get(name, len(rank)), name))


def corruption_aliases() -> dict[str, str]:
    """Every accepted name (canonical names and aliases) -> its canonical name."""
    return dict(_ALIASES)


def get_corruption(name: str) -> Corruption:
    """The corruption called ``name`` (canonical or alias, any case).

    Returns:
        The registered :class:`Corruption` (its ``sample`` and ``apply`` are the two halves of
        :func:`corrupt`).

    Raises:
        DivfastError: an unknown name; the message lists the valid names and aliases.

    Example:
        >>> get_corruption("water_drop").name
        'waterdrop'
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _ALIASES:
        raise DivfastError(f"corruption: unknown name {name!r}; expected one of: "
                           f"{', '.join(list_corruptions())} (aliases: "
                           f"{', '.join(a for a in _ALIASES if a not in _REGISTRY)})")
    return _REGISTRY[_ALIASES[key]]


def check_severity(severity, option: str = "severity") -> float:
    """``severity`` as a float in [0, 10] rounded to six decimals, or an error naming ``option``.
    Numbers only (a str or a bool is an error: ``"4"`` in a Python call is more likely a bug than a
    severity)."""
    if isinstance(severity, torch.Tensor) and severity.numel() == 1 and severity.dtype != torch.bool:
        severity = severity.item()  # a 0-d tensor, e.g. from a sweep over severities
    if isinstance(severity, (bool, np.bool_)) or not isinstance(severity, (int, float, np.integer, np.floating)):
        raise DivfastError(f"{option}: expected a number in [0, 10], got {severity!r}")
    value = float(severity)
    if not math.isfinite(value) or not 0.0 <= value <= 10.0:
        raise DivfastError(f"{option}: expected a number in [0, 10] (the reference's scale), "
                           f"got {severity!r}")
    return round(value, 6)  # the precision of seeds and spec strings: 4.0000001 *is* 4.0


def check_seed(seed) -> int:
    """``seed`` as an int (bools and floats are errors naming ``seed``)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise DivfastError(f"seed: expected an integer, got {seed!r}")
    return int(seed)


_SPEC = re.compile(r"^([a-z][a-z_]*?)[-_@:]?(\d+(?:\.\d*)?|\.\d+)$")


def parse_dataset_spec(spec: str) -> tuple[str, float]:
    """Splits a dataset spec into a canonical corruption name and a severity.

    Args:
        spec: ``"clean"`` or ``<name><severity>``, e.g. ``"lines1.6"``, ``"plasma_noise4.75"``.

    Returns:
        ``(name, severity)``: ``"lines1.6"`` -> ``("lines", 1.6)``; ``"clean"`` -> ``("clean", 0.0)``.

    Example:
        >>> parse_dataset_spec("water_drop7")
        ('waterdrop', 7.0)

    The name may be canonical or an alias (``plasma_noise4.75`` -> ``("plasma", 4.75)``); a
    separator is allowed (``lines-1.6``). Unknown names and severities outside [0, 10] are errors
    naming ``--dataset``.
    """
    if not isinstance(spec, str):
        raise DivfastError(f"--dataset: expected a string such as 'lines1.6', got {spec!r}")
    text = spec.strip().lower()
    if text == "clean":
        return "clean", 0.0
    match = _SPEC.match(text)
    if match is None or match.group(1) not in _ALIASES:
        raise DivfastError(f"--dataset: unknown dataset spec {spec!r}; expected 'clean' or "
                           f"<corruption><severity> such as 'lines1.6', with a corruption among: "
                           f"{', '.join(list_corruptions())}")
    severity = check_severity(float(match.group(2)), option=f"--dataset {spec!r}: severity")
    return _ALIASES[match.group(1)], severity


def format_dataset_spec(name: str, severity: float) -> str:
    """The canonical spec string: ``("plasma", 4)`` -> ``"plasma4.0"``; ``("clean", 0)`` -> ``"clean"``.

    Six decimals at most, the precision that seeds the images, so parsing the string back gives
    the same images.
    """
    if name == "clean":
        return "clean"
    canonical = get_corruption(name).name
    text = f"{check_severity(severity):.6f}".rstrip("0")
    return f"{canonical}{text}0" if text.endswith(".") else f"{canonical}{text}"


def _check_keys(keys, batch: int) -> list:
    if keys is None:
        return list(range(batch))
    if isinstance(keys, torch.Tensor):
        keys = keys.tolist()
    keys = list(keys)
    if len(keys) != batch:
        raise DivfastError(f"keys: expected one key per image ({batch}), got {len(keys)}")
    for key in keys:
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer, str)):
            raise DivfastError(f"keys: expected int dataset indices or str relative paths, got "
                               f"{key!r} ({type(key).__name__})")
    return keys


def corruption_parameters(name: str, severity: float, height: int, width: int,
                          keys: Sequence[int | str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every image's parameters, stacked ``(B, ...)`` on the CPU (float64, int64 or bool).

    Args:
        name: corruption name or alias.
        severity: float in [0, 10].
        height, width: the images' size (parameters scale with it).
        keys: one per image, its dataset index (int) or relative path (str).
        seed: the user's seed.

    Returns:
        A dict of tensors, one row per image. Bulk random fields are represented by their seed
        (``table_seed``, ``phase_seed``), expanded on the device by ``apply``.

    Example:
        >>> corruption_parameters("lines", 1.6, 224, 224, keys=[0, 1])["row"].shape
        torch.Size([2, 35])

    The same values feed :func:`corrupt` on any device; this is also how tests and users inspect
    what an image received (the reference's ``record=True``).
    """
    corruption = get_corruption(name)
    severity = check_severity(severity)
    seed = check_seed(seed)
    keys = list(keys.tolist() if isinstance(keys, torch.Tensor) else keys)
    keys = _check_keys(keys, len(keys))
    per_image = []
    for key in keys:
        rng = ImageRandom(derive_seed(corruption.name, severity, key, seed))
        per_image.append(corruption.sample(rng, height, width, severity))
    if not per_image:
        return {}
    out = {}
    for field in per_image[0]:
        stacked = np.stack([np.asarray(p[field]) for p in per_image])
        out[field] = torch.from_numpy(stacked)
    return out


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise DivfastError(f"images: expected a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise DivfastError(f"images: expected shape (B, 3, H, W) with 3 colour channels, got "
                           f"{tuple(images.shape)} (for one image use images[None]; repeat a grey "
                           f"channel with .expand(-1, 3, -1, -1))")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DivfastError(f"images: expected uint8 (0-255) or floating point (0-1), got {images.dtype}")
    if min(images.shape[2:]) < MIN_IMAGE_SIZE:
        raise DivfastError(f"images: expected height and width >= {MIN_IMAGE_SIZE}, got "
                           f"{tuple(images.shape[2:])}")
    if images.is_floating_point() and images.numel():
        lo, hi = torch.aminmax(images)
        if not (torch.isfinite(lo) and torch.isfinite(hi) and lo >= 0 and hi <= 1):
            raise DivfastError(f"images: floating-point images must lie in [0, 1], got values in "
                               f"[{lo.item():.4g}, {hi.item():.4g}]")


def corrupt(images: torch.Tensor, name: str, severity: float, seed: int = 0,
            keys: Sequence[int | str] | None = None) -> torch.Tensor:
    """Applies corruption ``name`` at ``severity`` to a batch, each image with its own parameters.

    Args:
        images: ``(B, 3, H, W)`` uint8 in 0-255 or floating point in [0, 1], on any device.
        name: a name from :func:`list_corruptions` or an alias (``plasma_noise``, ``water_drop``, ...).
        severity: the reference's scale, a float in [0, 10].
        seed: the user's seed; with the keys it fixes every image's parameters.
        keys: one per image, its dataset index (int) or relative path (str); default ``0..B-1``.
            Pass the dataset indices so an image's corruption does not depend on its batch.

    Returns:
        The corrupted batch, same shape, dtype and device. uint8 output is rounded to the nearest
        integer (the reference truncates); floating-point output is clipped to [0, 1], not quantised.

    Example:
        >>> x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
        >>> corrupt(x, "checkerboard", 4.0, seed=0, keys=[10, 11]).shape
        torch.Size([2, 3, 32, 32])
    """
    corruption = get_corruption(name)
    severity = check_severity(severity)
    seed = check_seed(seed)
    _check_images(images)
    batch, _, height, width = images.shape
    keys = _check_keys(keys, batch)
    if batch == 0:
        return images.clone()
    params = corruption_parameters(corruption.name, severity, height, width, keys, seed)
    device = images.device
    params = {k: (v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device))
              for k, v in params.items()}
    out = torch.empty_like(images, memory_format=torch.contiguous_format)
    step = batch if device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // (height * width))
    for start in range(0, batch, step):  # on CPUs, chunks whose temporaries stay in cache
        part = {k: v[start:start + step] for k, v in params.items()}
        x = images[start:start + step].to(torch.float32)
        if images.is_floating_point():
            x = x * 255.0
        y = corruption.apply(x.contiguous(), part).clamp_(0.0, 255.0)
        out[start:start + step] = y.round_() if images.dtype == torch.uint8 else y / 255.0
    return out
