"""Stateless metrics: ``metric(inputs) == compute(batch_stats(all inputs))``."""

from divfast.functional.attribution import attribution_diversity, method_agreement, subset_diversity
from divfast.functional.prediction import prediction_diversity
from divfast.functional.representation import cka, hsic_matrix

__all__ = ["attribution_diversity", "cka", "hsic_matrix", "method_agreement", "prediction_diversity",
           "subset_diversity"]
