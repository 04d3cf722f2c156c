"""Stateless metrics: ``metric(inputs) == compute(batch_stats(all inputs))``."""

from divfast.functional.prediction import prediction_diversity

__all__ = ["prediction_diversity"]
