"""Stateful, additive metrics: update / compute / merge / sync / state_dict."""

from divfast.metrics.attribution import AttributionDiversity
from divfast.metrics.prediction import PredictionDiversity
from divfast.metrics.representation import RepresentationSimilarity

__all__ = ["AttributionDiversity", "PredictionDiversity", "RepresentationSimilarity"]
