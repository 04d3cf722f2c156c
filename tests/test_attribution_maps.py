"""member_attributions: the fast path equals captum, targets mean what the docs say, no side
effects.

Most tests use tiny Members (a small conv net with BatchNorm, wrapped to resize and normalise like a
timm member) so that Integrated Gradients with 50 steps stays cheap; one pair of resnet10t members
checks the real timm path. Members of input 24x24 and 32x32 see the same 32x32 images.
"""

import sys

import pytest
import torch
import torch.nn as nn

from divfast.attribution import member_attributions
from divfast.attribution.integrated_gradients import gauss_legendre
from divfast.data.members import Member, MemberInfo, create_member
from divfast.errors import DivfastError

try:
    import captum.attr as captum_attr
except ImportError:  # the GPU image lacks captum: comparisons skip there, the fast path still runs
    captum_attr = None

needs_captum = pytest.mark.skipif(captum_attr is None, reason="captum is not installed")
BACKENDS = ["fast", pytest.param("captum", marks=needs_captum)]


def _tiny_member(seed: int, size: int, classes: int = 10) -> Member:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.Tanh(),
                        nn.Conv2d(8, 8, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, classes))
    with torch.no_grad():  # running statistics away from (0, 1), so train mode would differ
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    info = MemberInfo("tiny", classes, (3, size, size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Member(net, info).eval()


def _explicit_targets(members, images, target, labels):
    """The class each member's map explains ``(M, B)``, written out from the definitions."""
    with torch.no_grad():
        logits = torch.stack([m(images) for m in members])  # (M, B, C)
    if target == "label":
        return labels.expand(len(members), -1)
    if target == "member":
        return logits.argmax(dim=2)
    ensemble = logits.mean(dim=0).argmax(dim=1)  # (B,) averaged logits, as evaluate() scores
    return ensemble.expand(len(members), -1)


def _close(actual, expected):
    # Saliency of fresh models is small (~1e-3): scale the absolute tolerance with the maps.
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def tiny():
    return [_tiny_member(0, 24), _tiny_member(1, 32), _tiny_member(2, 32)]


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    return [create_member("resnet10t", 10, (3, 24, 24)).eval(),
            create_member("resnet10t", 10, (3, 32, 32)).eval()]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


# --- equivalence with captum ----------------------------------------------------------------------


@needs_captum
@pytest.mark.parametrize("target", ["label", "member", "ensemble"])
@pytest.mark.parametrize("abs_", [True, False])
def test_fast_saliency_equals_captum(tiny, batch, target, abs_):
    images, labels = batch
    ours = member_attributions(tiny, images, target, labels, abs=abs_)
    classes = _explicit_targets(tiny, images, target, labels)  # (M, B)
    for i, member in enumerate(tiny):
        ref = captum_attr.Saliency(member).attribute(images.clone().requires_grad_(),
                                                     target=classes[i], abs=abs_)
        _close(ours[i], ref)
    _close(member_attributions(tiny, images, target, labels, abs=abs_, backend="captum"), ours)


@needs_captum
def test_fast_saliency_equals_captum_on_timm_members(resnets, batch):
    images, labels = batch
    signed = member_attributions(resnets, images, labels=labels, abs=False)
    absolute = member_attributions(resnets, images, labels=labels)
    for i, member in enumerate(resnets):
        x = images.clone().requires_grad_()
        _close(signed[i], captum_attr.Saliency(member).attribute(x, target=labels, abs=False))
        _close(absolute[i], captum_attr.Saliency(member).attribute(x, target=labels))
    assert bool((signed != 0).any())


@needs_captum
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_fast_ig_equals_captum_on_timm_members(resnets, batch, steps):
    images, labels = batch[0][:3], batch[1][:3]
    ours = member_attributions(resnets, images, labels=labels, method="ig", ig_steps=steps,
                               abs=False)
    for i, member in enumerate(resnets):
        ref = captum_attr.IntegratedGradients(member).attribute(images, target=labels,
                                                                n_steps=steps)
        _close(ours[i], ref)


@needs_captum
@pytest.mark.parametrize("target", ["label", "member", "ensemble"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_fast_ig_equals_captum(tiny, batch, target, steps):
    images, labels = batch
    ours = member_attributions(tiny, images, target, labels, method="ig", ig_steps=steps,
                               abs=False)
    classes = _explicit_targets(tiny, images, target, labels)
    for i, member in enumerate(tiny):
        ref = captum_attr.IntegratedGradients(member).attribute(images, target=classes[i],
                                                                n_steps=steps)
        _close(ours[i], ref)
    via_captum = member_attributions(tiny, images, target, labels, method="ig", ig_steps=steps,
                                     backend="captum")
    _close(via_captum, ours.abs())


@needs_captum
def test_gauss_legendre_is_captums_rule():
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    for n in (1, 2, 3, 10, 50):
        assert gauss_legendre(n) == (alphas(n), step_sizes(n))


@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_gauss_legendre_nodes_and_weights(n):
    nodes, weights = gauss_legendre(n)
    assert len(nodes) == len(weights) == n
    assert all(0 < a < 1 for a in nodes) and nodes == sorted(nodes)
    assert all(w > 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-12)
    # exact for polynomials of degree < 2n: the integral of α^k over [0, 1] is 1 / (k + 1)
    for k in range(2 * n):
        assert sum(w * a**k for a, w in zip(nodes, weights)) == pytest.approx(1 / (k + 1))


def test_ig_satisfies_completeness(tiny, batch):
    """Σ IG = f(x) - f(0) for the target logit: the quadrature integrates the real path."""
    images, labels = batch
    maps = member_attributions(tiny, images, labels=labels, method="ig", ig_steps=50, abs=False)
    with torch.no_grad():
        for i, member in enumerate(tiny):
            gain = (member(images) - member(torch.zeros_like(images))).gather(1, labels[:, None])
            torch.testing.assert_close(maps[i].sum(dim=(1, 2, 3)), gain[:, 0], rtol=1e-4,
                                       atol=1e-5)


# --- internal batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["saliency", "ig"])
@pytest.mark.parametrize("chunk", [1, 3, 5, 12, 1000])
def test_internal_batching_does_not_change_maps(tiny, batch, backend, method, chunk):
    images, labels = batch  # B = 4: chunks 3 and 5 are not divisors, 12 is 3 whole steps
    kwargs = dict(target="ensemble", labels=labels, method=method, ig_steps=7, abs=False,
                  backend=backend)
    whole = member_attributions(tiny, images, **kwargs)
    _close(member_attributions(tiny, images, internal_batch_size=chunk, **kwargs), whole)


# --- shapes and targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["saliency", "ig"])
@pytest.mark.parametrize("size", [1, 3])
def test_shape_and_dtype(tiny, backend, method, size):
    images = torch.rand(size, 3, 20, 28, generator=torch.Generator().manual_seed(size))
    maps = member_attributions(tiny[:2], images, "member", method=method, ig_steps=2,
                               backend=backend)
    assert maps.shape == (2, size, 3, 20, 28) and maps.dtype == torch.float32
    assert bool((maps >= 0).all()) and bool((maps > 0).any()) and not maps.requires_grad


def test_empty_batch(tiny):
    maps = member_attributions(tiny, torch.rand(0, 3, 32, 32), labels=torch.zeros(0, dtype=int))
    assert maps.shape == (3, 0, 3, 32, 32) and maps.dtype == torch.float32


@pytest.mark.parametrize("method", ["saliency", "ig"])
@pytest.mark.parametrize("target", ["member", "ensemble"])
def test_predicted_targets_are_explicit_labels(tiny, batch, method, target):
    images, labels = batch
    maps = member_attributions(tiny, images, target, method=method, ig_steps=2, abs=False)
    classes = _explicit_targets(tiny, images, target, labels)  # (M, B)
    for i, member in enumerate(tiny):
        alone = member_attributions([member], images, labels=classes[i], method=method,
                                    ig_steps=2, abs=False)
        _close(maps[i], alone[0])


def test_ensemble_target_uses_mean_logits_not_mean_probabilities():
    """Two members where averaging logits and averaging probabilities disagree: the ensemble's
    prediction is evaluate()'s, from averaged logits."""

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.register_buffer("logits", torch.tensor(logits))
            # Small enough to keep the argmax; different per class so the maps show the target.
            self.slope = nn.Parameter(torch.tensor([0.01, 0.02, 0.03]))

        def forward(self, x):  # (N, 3, H, W) -> (N, 3)
            return self.logits + x.mean(dim=(1, 2, 3))[:, None] * self.slope

    members = [Fixed([10.0, 0.0, 9.0]), Fixed([0.0, 3.0, 0.0])]
    images = torch.rand(2, 3, 4, 4)
    # mean logits: [5, 1.5, 4.5] -> class 0; mean probabilities would favour class 1 (~0.47)
    maps = member_attributions(members, images, "ensemble", abs=False)
    expected = _explicit_targets(members, images, "ensemble", None)
    assert expected[0].tolist() == [0, 0]
    torch.testing.assert_close(maps, torch.full_like(maps, 0.01 / (3 * 4 * 4)))


def test_fast_path_on_device_equals_cpu(tiny, batch, device):
    images, labels = batch
    moved = [_tiny_member(i, m.info.input_size[1]).to(device) for i, m in enumerate(tiny)]
    for method in ("saliency", "ig"):
        on_device = member_attributions(moved, images.to(device), labels=labels.to(device),
                                        method=method, ig_steps=3)
        assert on_device.device.type == device.type
        cpu = member_attributions(tiny, images, labels=labels, method=method, ig_steps=3)
        torch.testing.assert_close(on_device.cpu(), cpu, rtol=1e-4,
                                   atol=1e-5 * float(cpu.abs().max()))


# --- no side effects ------------------------------------------------------------------------------


def test_no_parameter_grads_modes_restored_and_no_grad_context(tiny, batch):
    images, labels = batch
    members = [_tiny_member(i, m.info.input_size[1]) for i, m in enumerate(tiny)]
    members[0].train()
    members[1].train()
    members[1].model[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    modes = [[mod.training for mod in m.modules()] for m in members]
    reference = member_attributions(tiny, images, labels=labels)  # all in eval mode
    for method in ("saliency", "ig"):
        with torch.no_grad():
            maps = member_attributions(members, images, labels=labels, method=method,
                                       ig_steps=2)
        assert [[mod.training for mod in m.modules()] for m in members] == modes
        assert all(p.grad is None for m in members for p in m.parameters())
        assert not images.requires_grad and not maps.requires_grad
        if method == "saliency":
            _close(maps, reference)  # BatchNorm ran on its running statistics


def test_existing_parameter_grads_untouched(tiny, batch):
    images, labels = batch
    member = _tiny_member(0, 24)
    for p in member.parameters():
        p.grad = torch.full_like(p, 3.0)
    member_attributions([member], images, labels=labels, method="ig", ig_steps=2)
    assert all(bool((p.grad == 3.0).all()) for p in member.parameters())


# --- bad input ------------------------------------------------------------------------------------


class _Nan(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 4)[:, :10] * float("nan")


@pytest.mark.parametrize("kwargs, argument", [
    (dict(members=[]), "members"),
    (dict(members="resnet"), "members"),
    (dict(members=[lambda x: x]), "members"),
    (dict(images=torch.rand(3, 32, 32)), "images"),
    (dict(images=torch.rand(4, 1, 32, 32)), "images"),
    (dict(images=torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)), "images"),
    (dict(images=torch.full((4, 3, 32, 32), float("nan"))), "images"),
    (dict(labels=None), "labels"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(4)), "labels"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), "labels"),
    (dict(labels=torch.tensor([0, -1, 3, 2])), "labels"),
    (dict(target="prediction"), "target"),
    (dict(method="gradcam"), "method"),
    (dict(backend="jax"), "backend"),
    (dict(ig_steps=0), "ig_steps"),
    (dict(ig_steps=2.5), "ig_steps"),
    (dict(internal_batch_size=0), "internal_batch_size"),
    (dict(internal_batch_size=-3), "internal_batch_size"),
])
def test_bad_input_names_the_argument(tiny, batch, kwargs, argument):
    images, labels = batch
    call = dict(members=tiny[:2], images=images, labels=labels, method="ig", ig_steps=2)
    call.update(kwargs)
    with pytest.raises(DivfastError, match=rf"^{argument}:"):
        member_attributions(**call)


@pytest.mark.parametrize("target", ["label", "member", "ensemble"])
def test_members_disagreeing_on_class_count(batch, target):
    images, labels = batch
    members = [_tiny_member(0, 24), _tiny_member(1, 32, classes=5)]
    with pytest.raises(DivfastError, match=r"^members: members\[1\].* 5 classes .* 10"):
        member_attributions(members, images, target, labels % 5)


@pytest.mark.parametrize("method", ["saliency", "ig"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_maps_name_the_member(tiny, batch, method, backend):
    images, labels = batch
    with pytest.raises(DivfastError, match=r"^members: members\[1\] \(_Nan\).*non-finite"):
        member_attributions([tiny[0], _Nan()], images, labels=labels, method=method,
                            ig_steps=2, backend=backend)


def test_captum_backend_without_captum(tiny, batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(DivfastError, match=r"^backend: 'captum' needs the captum package"):
        member_attributions(tiny, batch[0], labels=batch[1], backend="captum")


def test_logits_that_ignore_the_pixels_have_zero_maps():
    """A model whose logits do not depend on its input has zero saliency, not an autograd error."""

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.5, 2.0, -1.0]))

        def forward(self, x):  # (N, 3, H, W) -> (N, 3), independent of x
            return self.bias.expand(x.shape[0], -1)

    images = torch.rand(2, 3, 6, 6)
    for method in ("saliency", "ig"):
        maps = member_attributions([Constant()], images, "member", method=method, ig_steps=2)
        assert maps.shape == (1, 2, 3, 6, 6) and not maps.any()
