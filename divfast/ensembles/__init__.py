"""Ensemble consensus (average, vote, median, geometric), evaluation, the sweep over every
k-member subset of a pool, the layer features it compares (representation similarity), and the
difficulty functions of its members' methodologies."""

from divfast.ensembles.cache import LogitsCache, member_logits
from divfast.ensembles.compare import compare_ensembles
from divfast.ensembles.consensus import CONSENSUS_RULES, consensus, consensus_predictions
from divfast.ensembles.difficulty import difficulty_analysis
from divfast.ensembles.evaluate import evaluate
from divfast.ensembles.features import GramCapture, default_layers, list_layers, resolve_layers
from divfast.ensembles.sweep import run_sweep, sweep

__all__ = ["CONSENSUS_RULES", "GramCapture", "LogitsCache", "compare_ensembles", "consensus",
           "consensus_predictions",
           "default_layers", "difficulty_analysis", "evaluate", "list_layers", "member_logits",
           "resolve_layers", "run_sweep", "sweep"]
