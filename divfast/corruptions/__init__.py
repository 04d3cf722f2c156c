"""Natural corruptions: the ImageNet-C-bar family, regenerated offline, batched and seeded per image.

>>> from divfast.corruptions import corrupt, list_corruptions, parse_dataset_spec
>>> parse_dataset_spec("lines1.6")
('lines', 1.6)

The paper's four come first in :func:`list_corruptions` (lines, plasma, checkerboard, waterdrop),
then the rest of ImageNet-C-bar. Reference names are aliases (``plasma_noise``,
``checkerboard_cutout``, ``water_drop``).

Each corruption follows the reference implementation (facebookresearch/augmentation-corruption,
``imagenet_c_bar/corrupt.py``): the same formulas and parameter distributions, severity mapped by
``s * max / 10``, pixel lengths given at 224 px scaled with the image's smaller side. Where we depart
from it, on purpose:

* every image's parameters come from its own seeded stream (:mod:`divfast.corruptions.random`), not
  from NumPy's global state in whichever DataLoader worker got the image;
* uint8 output is rounded to the nearest level, not truncated (the reference's ``astype(np.uint8)``
  darkens by half a level on average, and its lines truncate after every line);
* checkerboard: ``floor`` cells with an offset grid, where the reference truncates toward zero and
  wraps negative indices (cells sharing draws); the grey area is severity / 20 either way;
* lines: exact segment end points (the reference truncates them to integers) and float blending;
* perlin_noise: a uniformly random permutation table (the reference's swap loop is biased) and
  (1, 0) for a zero gradient (the reference divides by zero: NaN pixels);
* cocentric_sine_waves: a ring width of at least 1e-6 px (the reference's U(0, w) can be 0: 0/0).

Kept as the reference has them, though surprising: sparkles at severity 0 still brighten (radius 0
skips the length term, leaving the ray fraction as the weight), inverse_sparkles at severity 0
whiten up to a quarter of each pixel, blue_noise_sample at severity 0 blacks out the ~0.6 % of
pixels below -2.5 standard deviations, and the refraction offset is rounded to 1e-3 px.
"""

from divfast.corruptions.registry import (
    Corruption,
    check_seed,
    check_severity,
    corrupt,
    corruption_aliases,
    corruption_parameters,
    format_dataset_spec,
    get_corruption,
    list_corruptions,
    parse_dataset_spec,
)

# Importing the family modules registers their corruptions.
from divfast.corruptions import masks as _masks  # noqa: E402,F401  lines, checkerboard
from divfast.corruptions import procedural as _procedural  # noqa: E402,F401  plasma, perlin, sines
from divfast.corruptions import warps as _warps  # noqa: E402,F401  waterdrop, caustic refraction
from divfast.corruptions import sparkles as _sparkles  # noqa: E402,F401
from divfast.corruptions import spectral as _spectral  # noqa: E402,F401  blue noise, brownish noise

__all__ = ["Corruption", "check_seed", "check_severity", "corrupt", "corruption_aliases", "corruption_parameters",
           "format_dataset_spec", "get_corruption", "list_corruptions", "parse_dataset_spec"]
