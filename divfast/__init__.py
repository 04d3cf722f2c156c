"""divfast: measure and train diversity in deep-learning ensembles.

Importing divfast never initialises CUDA. The compiled kernels (``divfast._C``) load on first use of an
op; without them every op falls back to its pure-PyTorch reference with one warning.
"""

__version__ = "0.1.0"

from divfast.functional import prediction_diversity  # noqa: E402
from divfast.metrics import PredictionDiversity  # noqa: E402

__all__ = ["PredictionDiversity", "prediction_diversity", "__version__"]
