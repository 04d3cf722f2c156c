"""Natural corruptions: the ImageNet-C-bar family, regenerated offline, batched and seeded per image.

>>> from divfast.corruptions import corrupt, list_corruptions, parse_dataset_spec
>>> parse_dataset_spec("lines1.6")
('lines', 1.6)

The paper's four come first in :func:`list_corruptions` (lines, plasma, checkerboard, waterdrop),
then the rest of ImageNet-C-bar. Reference names are aliases (``plasma_noise``,
``checkerboard_cutout``, ``water_drop``).
"""

from divfast.corruptions.registry import (
    Corruption,
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

__all__ = ["Corruption", "check_severity", "corrupt", "corruption_aliases", "corruption_parameters",
           "format_dataset_spec", "get_corruption", "list_corruptions", "parse_dataset_spec"]
