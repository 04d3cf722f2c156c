"""Stateless metrics: ``metric(inputs) == compute(batch_stats(all inputs))``."""

from divfast.functional.attribution import attribution_diversity, method_agreement, subset_diversity
from divfast.functional.prediction import prediction_diversity

__all__ = ["attribution_diversity", "method_agreement", "prediction_diversity", "subset_diversity"]
