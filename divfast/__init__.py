"""divfast: measure and train diversity in deep-learning ensembles.

Importing divfast is cheap and never initialises CUDA: the public names load on first use, and the
compiled kernels (``divfast._C``) load on the first op call; without them every op falls back to its
pure-PyTorch reference with one warning.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "prediction_diversity": "divfast.functional",
    "attribution_diversity": "divfast.functional",
    "PredictionDiversity": "divfast.metrics",
    "AttributionDiversity": "divfast.metrics",
}

__all__ = ["AttributionDiversity", "PredictionDiversity", "attribution_diversity", "prediction_diversity",
           "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'divfast' has no attribute {name!r}")
