"""Ensemble evaluation."""

from divfast.ensembles.evaluate import evaluate

__all__ = ["evaluate"]
