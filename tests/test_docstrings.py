"""The examples in the public API's docstrings run and print what they claim (doctest)."""

import doctest
import importlib

import pytest

MODULES = [
    "divfast._ops.pair_counts",
    "divfast._ops.attribution_stats",
    "divfast._ops.hsic",
    "divfast._ops.ensemble_sweep",
    "divfast.corruptions",
    "divfast.corruptions.registry",
    "divfast.data.corrupted",
    "divfast.functional.attribution",
    "divfast.metrics.attribution",
    "divfast.report.attribution_grid",
    "divfast.ensembles.features",
    "divfast.ensembles.cache",
    "divfast.ensembles.consensus",
    "divfast.ensembles.difficulty",
    "divfast.ensembles.sweep",
    "divfast.report.cka_maps",
    "divfast.report.sweep_plots",
    "divfast.functional.representation",
    "divfast.metrics.representation",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
