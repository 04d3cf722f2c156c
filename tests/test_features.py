"""Layer capture for CKA: layer names and globs, Grams formed inside forward hooks against the same
Grams computed from activations taken by a manual forward, the centring that leaves the unbiased
HSIC unchanged, hook lifetime, recording only when asked, and one-line errors."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from divfast.data.members import Member, MemberInfo, create_member
from divfast.ensembles import features
from divfast.ensembles.features import (GramCapture, batch_gram, default_layers, list_layers,
                                        resolve_layers)
from divfast.errors import DivfastError
from divfast.functional.representation import (cka_from_hsic, gram_matrices,
                                               hsic_matrix_from_grams)

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(6, 8), act=nn.ReLU(),
        block=nn.Sequential(nn.Linear(8, 8), nn.Tanh()), fc2=nn.Linear(8, 3)))


MLP_LAYERS = ["fc1", "act", "block", "block.0", "block.1", "fc2"]


def small_member(name: str) -> Member:
    info = MemberInfo("mlp", 3, (3, 2, 2), (0.5,) * 3, (0.25,) * 3, name=name)
    return Member(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), info)


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """The oracle: centre in float64, then X X^T."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=0)
    return x @ x.T


@pytest.fixture(scope="module")
def member():
    torch.manual_seed(0)
    return create_member("resnet10t", 10, input_size=(3, 32, 32)).eval()


@pytest.fixture
def images(gen):
    return torch.rand(8, 3, 32, 32, generator=gen)


def manual_activations(member: Member, images: torch.Tensor) -> dict:
    """timm ResNet's forward written out by hand, copying each output before anything later can
    change it in place."""
    net = member.model
    out = {}
    with torch.no_grad():
        x = (images - member.mean) / member.std
        x = net.act1(net.bn1(net.conv1(x)))
        out["act1"] = x.clone()
        x = net.maxpool(x)
        for stage in STAGES:
            x = getattr(net, stage)(x)
            out[stage] = x.clone()
        out["global_pool"] = net.global_pool(x)
        out["fc"] = net.fc(out["global_pool"])
    return out


# ---------------------------------------------------------------- layer names


def test_list_layers_every_submodule_in_model_order(member):
    assert list_layers(mlp()) == MLP_LAYERS
    assert list_layers(member) == [n for n, _ in member.model.named_modules() if n]
    assert "" not in list_layers(member) and "mean" not in list_layers(member)


def test_default_layers(member):
    assert default_layers(member) == ["act1"] + STAGES  # timm's feature_info
    assert default_layers(member.model) == ["act1"] + STAGES
    assert default_layers(mlp()) == ["fc1", "act", "block", "fc2"]  # the children


def test_default_layers_from_a_timm_feature_info_object():
    import timm

    net = timm.create_model("resnet10t", features_only=True, out_indices=(1, 2))
    assert default_layers(net) == ["layer1", "layer2"]


def test_default_layers_fall_back_to_children_when_feature_info_names_other_modules():
    net = mlp()
    net.feature_info = [{"module": "fc1"}, {"module": "inner.blocks.0"}]
    assert default_layers(net) == ["fc1", "act", "block", "fc2"]
    net.feature_info = [{"module": "fc2"}, {"module": "fc1"}]
    assert default_layers(net) == ["fc2", "fc1"]


def test_resolve_layers_globs_order_and_duplicates(member):
    assert resolve_layers(member, None) == default_layers(member)
    assert resolve_layers(member, ["layer?"]) == STAGES
    assert resolve_layers(member, ["*"]) == list_layers(member)
    assert resolve_layers(member, ["fc", "layer2", "act1", "layer2"]) == ["act1", "layer2", "fc"]
    inside = resolve_layers(member, ["layer1*"])  # `*` crosses dots
    assert inside[0] == "layer1" and "layer1.0.conv1" in inside and "layer2" not in inside
    assert resolve_layers(mlp(), ["block.*", "fc?"]) == ["fc1", "block.0", "block.1", "fc2"]
    with pytest.raises(DivfastError):
        resolve_layers(mlp(), ["FC1"])  # case-sensitive


def test_no_match_names_the_argument_pattern_and_every_layer():
    message = r"^layers \(--layers\): 'nope' matches no module"
    with pytest.raises(DivfastError, match=message) as exc:
        resolve_layers(mlp(), ["fc1", "nope"])
    assert exc.value.args[0].endswith("available: " + ", ".join(MLP_LAYERS))


def test_no_match_lists_the_first_40_names_of_a_large_model(member):
    names = list_layers(member)
    assert len(names) > 40
    with pytest.raises(DivfastError) as exc:
        resolve_layers(member, ["layer9"])
    message = exc.value.args[0]
    assert "'layer9'" in message and ", ".join(names[:40]) in message
    assert names[40] not in message.split("available: ")[1].split(", ")
    assert message.endswith(f"... ({len(names) - 40} more)")


def test_empty_and_bare_string_patterns_are_errors():
    with pytest.raises(DivfastError, match=r"layers \(--layers\): expected at least one.*fc1, act"):
        resolve_layers(mlp(), [])
    with pytest.raises(DivfastError, match=r"got the string 'fc1'"):
        resolve_layers(mlp(), "fc1")
    with pytest.raises(DivfastError, match="no submodules"):
        resolve_layers(nn.Linear(2, 2), None)


def test_per_member_layer_lists():
    a, b = mlp(), mlp()
    capture = GramCapture([a, b], [["fc2", "fc1"], None])
    assert capture.layers == [["fc1", "fc2"], ["fc1", "act", "block", "fc2"]]
    assert capture.names == ["0/fc1", "0/fc2", "1/fc1", "1/act", "1/block", "1/fc2"]
    assert capture.num_grams == 6
    shared = GramCapture([a, b], ["fc*"])
    assert shared.layers == [["fc1", "fc2"], ["fc1", "fc2"]]
    with pytest.raises(DivfastError, match=r"\(--layers\): 3 per-member lists for 2 members"):
        GramCapture([a, b], [["fc1"], ["fc1"], ["fc1"]])
    with pytest.raises(DivfastError, match="not a mix"):
        GramCapture([a, b], ["fc1", ["fc2"]])
    with pytest.raises(DivfastError, match=r"'nope' matches no module of member 1 \(Sequential\)"):
        GramCapture([a, b], [["fc1"], ["nope"]])
    with pytest.raises(DivfastError, match="expected at least one"):
        GramCapture([a, b], [])


def test_names_use_distinct_member_names_else_indices():
    assert GramCapture([small_member("a"), small_member("b")], ["1"]).names == ["a/1", "b/1"]
    assert GramCapture([small_member("a"), small_member("a")], ["1"]).names == ["0/1", "1/1"]
    assert GramCapture([small_member("a"), mlp()]).names[:2] == ["0/0", "0/1"]  # mlp: no name


def test_bad_options():
    with pytest.raises(DivfastError, match="^members:"):
        GramCapture([])
    with pytest.raises(DivfastError, match="^kernel:"):
        GramCapture([mlp()], kernel="cosine")
    with pytest.raises(DivfastError, match="^bandwidth:"):
        GramCapture([mlp()], kernel="rbf", bandwidth=0.0)
    with pytest.raises(DivfastError, match="^gram_dtype:"):
        GramCapture([mlp()], gram_dtype=torch.float16)
    with pytest.raises(DivfastError, match="^x: expected features"):
        batch_gram(torch.zeros(4, 2, 2))


# ---------------------------------------------------------------- Grams


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_grams_equal_those_of_a_manual_forward(member, images, kernel):
    layers = ["act1"] + STAGES + ["global_pool", "fc"]
    with GramCapture([member], layers, kernel=kernel, gram_dtype=torch.float64) as capture:
        with capture.recording():
            logits = member(images)
        grams = capture.pop()
    acts = manual_activations(member, images)
    torch.testing.assert_close(acts["fc"], logits.detach(), rtol=0, atol=0)  # the oracle is right
    assert capture.names == [f"resnet10t/{layer}" for layer in layers]  # the member's name
    assert grams.shape == (len(layers), 8, 8) and grams.dtype == torch.float64
    if kernel == "linear":
        want = torch.stack([centred_gram(acts[layer]) for layer in layers])
    else:
        want = gram_matrices([acts[layer] for layer in layers], "rbf", 0.5)
    torch.testing.assert_close(grams, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_float32_products_return_float64_close_to_float64(member, images, kernel):
    out = {}
    for dtype in (torch.float32, torch.float64):
        with GramCapture([member], ["act1", "layer2", "fc"], kernel, gram_dtype=dtype) as capture:
            with capture.recording():
                member(images)
            out[dtype] = capture.pop()
        assert out[dtype].dtype == torch.float64
    scale = out[torch.float64].abs().amax(dim=(1, 2), keepdim=True)
    assert ((out[torch.float32] - out[torch.float64]).abs() / scale).max() < 1e-5


def test_grams_of_a_sequential_equal_a_manual_forward(gen):
    net = mlp()
    x = torch.randn(8, 6, generator=gen)
    with GramCapture([net], ["fc1", "block.1", "fc2"], gram_dtype=torch.float64) as capture, capture.recording():
        net(x)
    h = net.act(net.fc1(x))
    want = torch.stack([centred_gram(net.fc1(x)), centred_gram(net.block(h)),
                        centred_gram(net(x))])
    torch.testing.assert_close(capture.pop(), want, rtol=1e-12, atol=1e-12)


def test_linear_centring_leaves_the_unbiased_hsic_unchanged(gen):
    x = torch.rand(12, 30, generator=gen, dtype=torch.float64) + 0.5  # post-ReLU-like offsets
    y = torch.relu(x @ torch.randn(30, 20, generator=gen, dtype=torch.float64)) + 0.5
    centred = torch.stack([batch_gram(x), batch_gram(y)])
    raw = torch.stack([x @ x.T, y @ y.T])
    assert not torch.allclose(centred, raw)
    want = hsic_matrix_from_grams(raw)
    torch.testing.assert_close(hsic_matrix_from_grams(centred), want, rtol=1e-10,
                               atol=1e-10 * float(want.abs().max()))


def test_centring_keeps_float32_grams_accurate_under_large_offsets(gen):
    """What the centring is for: with a large common offset, float32 products of the raw features
    lose the small differences CKA measures; centred first, they keep them."""
    x = torch.relu(torch.randn(16, 2048, generator=gen)) + 5.0
    y = torch.relu(x @ torch.randn(2048, 512, generator=gen) / 45) + 5.0

    def cka(gram_x, gram_y):
        return float(cka_from_hsic(hsic_matrix_from_grams(torch.stack([gram_x, gram_y])))[0, 1])

    want = cka(batch_gram(x.double()), batch_gram(y.double()))
    f32 = torch.float32
    centred = abs(cka(batch_gram(x, dtype=f32), batch_gram(y, dtype=f32)) - want)
    raw = abs(cka((x @ x.T).double(), (y @ y.T).double()) - want)
    assert centred < 1e-7 and centred < raw / 100


def test_batch_gram_blocks_equal_one_product(gen, monkeypatch):
    x = torch.randn(8, 3, 5, 5, generator=gen).reshape(8, -1) * 10 + 50
    whole = batch_gram(x)
    monkeypatch.setitem(features.BLOCK_ELEMENTS, "cpu", 3 * 8)  # 3 columns a time, 1 left over
    torch.testing.assert_close(batch_gram(x), whole, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(whole, centred_gram(x), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n, d, dtype", [(64, 4096, torch.float32), (5, 5001, torch.float32),
                                         (64, 2048, torch.float16), (130, 4099, torch.float32)])
def test_wide_cpu_features_take_the_member_gram_kernel(gen, monkeypatch, n, d, dtype):
    """Float32 products of wide CPU features come from the attribution_stats kernel (the member Gram
    of n samples over d features is the batch-centred Gram): equal to the float64 Gram, and to the
    centre-then-GEMM path it replaces, for both kernels; odd sizes, float16, more than 64 samples."""
    from divfast._ops._load import has_kernel

    x = (torch.relu(torch.randn(n, d, generator=gen)) * 3 + 7).to(dtype)
    f32 = torch.float32
    kernel_built = has_kernel("attribution_stats", "CPU")
    assert features._use_member_gram_kernel(x, f32) == kernel_built
    assert not features._use_member_gram_kernel(x, torch.float64)
    assert not features._use_member_gram_kernel(x[:, :1000], f32)
    assert not features._use_member_gram_kernel(torch.zeros(features.MAX_KERNEL_SAMPLES + 1, d), f32)

    class NoGemm(dict):  # the GEMM path reads BLOCK_ELEMENTS first: fail if it runs
        def get(self, *args):
            raise AssertionError("the centre-then-GEMM path ran")

    want = centred_gram(x.double())
    for kernel in ("linear", "rbf"):
        if kernel_built:
            with monkeypatch.context() as patch:
                patch.setattr(features, "BLOCK_ELEMENTS", NoGemm())
                got = batch_gram(x, kernel, dtype=f32)
        else:
            got = batch_gram(x, kernel, dtype=f32)
        ref = want if kernel == "linear" else gram_matrices([x.double()], "rbf", 0.5)[0]
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
        monkeypatch.setattr(features, "_use_member_gram_kernel", lambda *args: False)
        gemm = batch_gram(x, kernel, dtype=f32)
        monkeypatch.undo()
        torch.testing.assert_close(got, gemm, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_wide_non_finite_or_overflowing_features_are_still_an_error(gen):
    x = torch.randn(8, 4096, generator=gen)
    x[3, 100] = float("inf")
    with pytest.raises(DivfastError, match="non-finite"):
        batch_gram(x, dtype=torch.float32)
    x[3, 100] = float("nan")
    with pytest.raises(DivfastError, match="non-finite"):
        batch_gram(x, dtype=torch.float32)
    with pytest.raises(DivfastError, match="non-finite"):  # float32 products overflow
        batch_gram(torch.randn(8, 4096, generator=gen) * 1e19, dtype=torch.float32)


def test_batch_gram_rbf_rule_and_degenerate_batches(gen):
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(batch_gram(x, "rbf", 0.7), gram_matrices([x], "rbf", 0.7)[0],
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(batch_gram(torch.ones(5, 3), "rbf"), torch.ones(5, 5, dtype=torch.float64))
    assert torch.equal(batch_gram(torch.randn(1, 3), "rbf"), torch.ones(1, 1, dtype=torch.float64))
    assert torch.equal(batch_gram(torch.randn(1, 3)), torch.zeros(1, 1, dtype=torch.float64))
    with pytest.raises(DivfastError, match="non-finite"):
        batch_gram(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_inplace_op_after_the_hooked_module_does_not_change_its_gram(gen):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()
    x = torch.randn(8, 3, 6, 6, generator=gen)
    with GramCapture([net], ["1"], gram_dtype=torch.float64) as capture, capture.recording():
        net(x)
    bn_out = net[1](net[0](x))
    assert (bn_out < 0).any()  # the ReLU does change it
    torch.testing.assert_close(capture.pop()[0], centred_gram(bn_out), rtol=1e-10, atol=1e-10)


def test_an_unchanged_output_reuses_its_gram_one_changed_in_place_does_not(gen, monkeypatch):
    calls = []
    gram = features._gram
    monkeypatch.setattr(features, "_gram", lambda *args: calls.append(1) or gram(*args))
    net = nn.Sequential(nn.BatchNorm1d(5), nn.Identity(), nn.ReLU(inplace=True), nn.Identity())
    x = torch.randn(8, 5, generator=gen)
    with GramCapture([net], ["*"], gram_dtype=torch.float64) as capture, capture.recording():
        net(x)
    got = capture.pop()
    assert len(calls) == 2  # the BatchNorm and the ReLU; each Identity reuses
    bn_out = net[0](x)
    want = torch.stack([centred_gram(bn_out)] * 2 + [centred_gram(torch.relu(bn_out))] * 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_grams_under_inference_mode_equal_those_under_no_grad(member, images):
    """Inference tensors have no version counter, so nothing is reused there: both paths agree."""
    out = []
    for mode in (torch.no_grad, torch.inference_mode):
        with GramCapture([member], ["*"], gram_dtype=torch.float64) as capture, mode():
            with capture.recording():
                member(images)
            out.append(capture.pop())
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12 * float(out[0].abs().max()))


def test_autocast_activations_are_upcast(gen):
    net = mlp()
    x = torch.randn(8, 6, generator=gen)
    with GramCapture([net], ["fc1"], gram_dtype=torch.float32) as capture:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with capture.recording():
                net(x)
            low = net.fc1(x)
    assert low.dtype == torch.bfloat16
    got = capture.pop()[0]
    torch.testing.assert_close(got, centred_gram(low), rtol=1e-5,
                               atol=1e-5 * float(got.abs().max()))


# ---------------------------------------------------------------- hooks and recording


def hook_count(*nets: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for net in nets for m in net.modules())


def test_hooks_are_removed_on_exit_and_on_an_exception(member, images):
    net = mlp()
    capture = GramCapture([member, net], [["*"], ["*"]])
    with capture:
        assert hook_count(member, net) == capture.num_grams + 2
    assert hook_count(member, net) == 0
    with pytest.raises(KeyError), capture:
        with capture.recording():
            member(images)
        raise KeyError("boom")
    assert hook_count(member, net) == 0
    with pytest.raises(RuntimeError, match="enter the capture first"):
        with capture.recording():
            pass


def test_hooks_record_only_inside_recording(gen):
    net = mlp()
    x1, x2 = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    with GramCapture([net], ["fc1"], gram_dtype=torch.float64) as capture:
        net(x1)
        with pytest.raises(RuntimeError, match="no recorded forward of member"):
            capture.pop()
        with capture.recording():
            net(x1)
        net(x2)  # an attribution pass, say: not recorded
        torch.testing.assert_close(capture.pop()[0], centred_gram(net.fc1(x1)))
        with pytest.raises(RuntimeError, match="no recorded forward"):
            capture.pop()  # pop cleared them
        with capture.recording():
            net(x1)
            net(x2)  # the last recorded forward wins
        torch.testing.assert_close(capture.pop()[0], centred_gram(net.fc1(x2)))
        with pytest.raises(RuntimeError, match="already entered"):
            capture.__enter__()


def test_every_member_must_run(gen):
    a, b = mlp(), mlp()
    with GramCapture([a, b], ["fc1"], gram_dtype=torch.float64) as capture:
        with capture.recording():
            a(torch.randn(8, 6, generator=gen))
        with pytest.raises(RuntimeError, match="member.s. 1 since the last pop"):
            capture.pop()


class Branchy(nn.Module):
    """``unused`` is never called; with ``twice``, ``shared`` is called twice per forward."""

    def __init__(self, twice: bool = False):
        super().__init__()
        self.fc, self.unused, self.shared = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()
        self.twice = twice

    def forward(self, x):
        x = self.shared(self.fc(x))
        return self.shared(x) if self.twice else x


def test_a_layer_off_the_forward_path_is_named(gen):
    net = Branchy()
    with GramCapture([net], ["fc", "unused"], gram_dtype=torch.float64) as capture:
        with capture.recording():
            net(torch.randn(8, 4, generator=gen))
        with pytest.raises(DivfastError, match=r"layers \(--layers\): 0/unused did not run"):
            capture.pop()


def test_a_layer_called_twice_is_an_error(gen):
    net = Branchy(twice=True)
    with GramCapture([net], ["shared"], gram_dtype=torch.float64) as capture:
        net(torch.randn(8, 4, generator=gen))  # not recorded: no error
        with capture.recording():
            with pytest.raises(DivfastError, match="0/shared ran twice in one forward"):
                net(torch.randn(8, 4, generator=gen))


class Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


def wrapped(make) -> nn.Sequential:
    return nn.Sequential(OrderedDict(out=Returns(make), fc=nn.Identity()))


def test_a_tuple_output_gives_its_first_tensor(gen):
    x = torch.randn(8, 5, generator=gen)
    net = wrapped(lambda x: ("meta", 2 * x, x))
    with GramCapture([net], ["out"], gram_dtype=torch.float64) as capture, capture.recording():
        net(x)
    torch.testing.assert_close(capture.pop()[0], centred_gram(2 * x))
    net = nn.Sequential(OrderedDict(rnn=nn.LSTM(5, 3, batch_first=True)))  # (output, (h, c))
    with GramCapture([net], ["rnn"], gram_dtype=torch.float64) as capture, capture.recording():
        output, _ = net(x[:, None])  # (8, 1, 3)
    torch.testing.assert_close(capture.pop()[0], centred_gram(output))


@pytest.mark.parametrize("make, kind", [(lambda x: {"x": x}, "dict"), (lambda x: ("a", 1), "tuple"),
                                        (lambda x: x.sum(), "scalar")])
def test_outputs_that_are_not_tensors_are_named(gen, make, kind):
    net = wrapped(make)
    with GramCapture([net], ["out"], gram_dtype=torch.float64) as capture, capture.recording():
        with pytest.raises(DivfastError, match=rf"layers \(--layers\): 0/out returned a {kind}"):
            net(torch.randn(8, 5, generator=gen))


def test_a_non_finite_activation_is_named(gen):
    net = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), log=Returns(torch.log),
                                    out=nn.Linear(4, 2)))
    x = -torch.rand(8, 4, generator=gen) - 10.0  # log of negatives: NaN
    net.fc.weight.data = torch.eye(4)
    net.fc.bias.data.zero_()
    with GramCapture([net], ["fc", "log", "out"], gram_dtype=torch.float64) as capture:
        with capture.recording():
            net(x)
        with pytest.raises(DivfastError, match=r"non-finite values .* output of 0/log, 0/out"):
            capture.pop()


def test_outputs_must_share_the_batch_size(gen):
    net = nn.Sequential(OrderedDict(split=Returns(lambda x: x.reshape(2 * x.shape[0], -1)),
                                    join=Returns(lambda x: x.reshape(x.shape[0] // 2, -1))))
    with GramCapture([net], ["split", "join"], gram_dtype=torch.float64) as capture:
        with capture.recording():
            net(torch.randn(8, 6, generator=gen))
        with pytest.raises(DivfastError, match="output of 0/join has 8 samples, that of 0/split "
                                               "has 16; every captured output needs the batch"):
            capture.pop()
    other = wrapped(lambda x: x)
    with GramCapture([other, mlp()], [["fc"], ["fc1"]], gram_dtype=torch.float64) as capture:
        with capture.recording():
            capture.members[0](torch.randn(8, 6, generator=gen))
            capture.members[1](torch.randn(5, 6, generator=gen))
        with pytest.raises(DivfastError, match="output of 1/fc1 has 5 samples, that of 0/fc has 8"):
            capture.pop()


class _WithUnused(nn.Module):
    """fc -> relu -> out, plus a module the forward never calls (like a fused ViT's attn_drop)."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        self.unused = nn.Dropout(0.1)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_missing_drop_removes_layers_that_never_ran_at_the_first_pop():
    net = _WithUnused().eval()
    capture = GramCapture([net], ["*"], missing="drop", gram_dtype=torch.float64)
    assert capture.layers == [["fc", "act", "out", "unused"]]
    x = torch.randn(10, 6)
    with capture:
        with capture.recording():
            net(x)
        with pytest.warns(RuntimeWarning, match=r"dropped layer\(s\) that did not run.*0/unused"):
            grams = capture.pop()
        assert grams.shape == (3, 10, 10)
        assert capture.layers == [["fc", "act", "out"]] and capture.num_grams == 3
        assert capture.names == ["0/fc", "0/act", "0/out"]
        with capture.recording():
            net(x)
        torch.testing.assert_close(capture.pop(), grams)  # later batches: same layers, no warning


def test_missing_error_is_the_default_and_drop_never_hides_a_layer_that_stops_running():
    net = _WithUnused().eval()
    with GramCapture([net], ["*"]) as capture:
        with capture.recording():
            net(torch.randn(5, 6))
        with pytest.raises(DivfastError, match=r"0/unused did not run"):
            capture.pop()
    with pytest.raises(DivfastError, match=r"missing: expected 'error' or 'drop'"):
        GramCapture([net], ["*"], missing="skip")
    nothing = GramCapture([net], ["unused"], missing="drop")  # every layer idle: still an error
    with nothing:
        with nothing.recording():
            net(torch.randn(5, 6))
        with pytest.raises(DivfastError, match=r"did not run"):
            nothing.pop()
