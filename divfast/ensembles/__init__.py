"""Ensemble evaluation, and the layer features it compares (representation similarity)."""

from divfast.ensembles.evaluate import evaluate
from divfast.ensembles.features import GramCapture, default_layers, list_layers, resolve_layers

__all__ = ["GramCapture", "default_layers", "evaluate", "list_layers", "resolve_layers"]
