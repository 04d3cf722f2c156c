"""compare_attribution_methods: per-method pairwise diversity and the agreement between methods."""

import pytest
import torch
from torch.utils.data import TensorDataset

from divfast.attribution import compare_attribution_methods, member_attributions
from divfast.attribution.agreement import parse_method
from divfast.data.members import create_member
from divfast.errors import DivfastError
from divfast.functional import attribution_diversity


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    return [create_member(arch, 10, (3, 32, 32)).eval()
            for arch in ("resnet10t", "resnet10t", "convnext_atto")]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(10, 3, 32, 32, generator=gen), torch.randint(0, 10, (10,), generator=gen))


def test_matches_the_functional_per_method(members, data):
    out = compare_attribution_methods(members, data, methods=("saliency", "ig2"), batch_size=4)
    images, labels = data.tensors
    for name, (method, steps) in (("saliency", ("saliency", 1)), ("ig2", ("ig", 2))):
        maps = member_attributions(members, images, labels=labels, method=method, ig_steps=steps)
        want = attribution_diversity(maps, normalize="l1")
        assert out["diversity"][name] == pytest.approx(want["diversity"], rel=1e-9)
        torch.testing.assert_close(torch.tensor(out["pairwise"][name]), torch.tensor(want["pairwise"]),
                                   rtol=1e-9, atol=1e-15)
    assert out["n_samples"] == 10 and out["methods"] == ["saliency", "ig2"]
    agreement = out["agreement"]
    assert agreement["pairs"] == [(0, 1), (0, 2), (1, 2)]
    assert set(agreement["correlation"]) == {"saliency", "ig2"}
    assert agreement["correlation"]["saliency"]["saliency"] == pytest.approx(1.0)
    assert -1.0 <= agreement["mean_correlation"] <= 1.0


def test_a_method_agrees_with_itself(members, data):
    out = compare_attribution_methods(members, data, methods=("ig10", "IG10 "), batch_size=5)
    assert out["agreement"]["mean_correlation"] == pytest.approx(1.0)


@pytest.mark.parametrize("name, expected", [("saliency", ("saliency", 1)), ("ig", ("ig", 50)),
                                            ("ig2", ("ig", 2)), ("IG50", ("ig", 50))])
def test_parse_method(name, expected):
    assert parse_method(name) == expected


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ("gradcam",)}, "methods"), ({"methods": ("ig0",)}, "methods"), ({"methods": ()}, "methods"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_input(members, data, kwargs, match):
    with pytest.raises(DivfastError, match=match):
        compare_attribution_methods(members, data, **kwargs)
    with pytest.raises(DivfastError, match="members"):
        compare_attribution_methods(members[:1], data)
