"""Representation similarity (minibatch CKA, paper Eq. 6) in evaluate() and `divfast eval`.

The report's CKA is checked against a direct computation: each member's layers captured by hooks of
this file (copied at once), per-batch Gram matrices from ``gram_matrices`` and the plain-PyTorch
reference HSIC, summed over the same batches evaluate uses. Then the batching rules, the depth
table, the hooks' lifetime and their independence from the attribution passes, and the CLI.
Members have random weights (``create_member``) and see a few digits at 32 px, so all of it is
quick on a CPU.
"""

import copy
import dataclasses
import importlib
import io
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import divfast.data
import divfast.report
from cli_helpers import assert_user_error
from cli_helpers import invoke as cli_invoke
from divfast._ops import reference
from divfast.data import digits_dataset
from divfast.ensembles import evaluate
from divfast.errors import DivfastError
from divfast.functional.representation import depth_alignment, gram_matrices
from divfast.report import render_eval

# the module, which `divfast.ensembles.evaluate` (the function) hides
evaluate_module = importlib.import_module("divfast.ensembles.evaluate")
STAGES = ["act1", "layer1", "layer2", "layer3", "layer4"]  # resnet10t's feature_info modules
BLOCK_KEYS = {"kernel", "bandwidth", "members", "layers", "names", "cka", "by_depth",
              "mean_cross_member_cka", "batches", "skipped_samples"}


@pytest.fixture(scope="module")
def small():
    """The first 23 test images: batches of 10 leave a last batch of 3, under the 4 HSIC needs."""
    return Subset(digits_dataset("test"), range(23))


def _report(members, data, batch_size=10, **kw):
    kw.setdefault("attribution", "none")
    kw.setdefault("gram_dtype", torch.float64)  # exact comparisons; float32 has its own test
    return evaluate(members, data, "clean", batch_size=batch_size, progress=False, **kw)


def _rep(members, data, batch_size=10, **kw):
    return _report(members, data, batch_size, representation=True, **kw)["representation"]


def _features(member, x, layers):
    """The outputs of ``layers`` of ``member.model`` on ``x``, copied as each module returns."""
    modules = dict(member.model.named_modules())
    out = {}
    handles = [modules[name].register_forward_hook(
        lambda mod, args, output, name=name: out.__setitem__(name, output.detach().clone()))
        for name in layers]
    try:
        with torch.no_grad():
            member(x)
    finally:
        for handle in handles:
            handle.remove()
    return [out[name] for name in layers]


def direct_cka(members, dataset, layers, batch_size, kernel="linear", bandwidth=0.5):
    """Minibatch CKA the long way: ``(G, G)`` CKA, batches used, samples skipped."""
    total, batches, skipped = None, 0, 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if len(x) < 4:
            skipped += len(x)
            continue
        feats = [f for member, names in zip(members, layers) for f in _features(member, x, names)]
        hsic = reference.hsic(gram_matrices(feats, kernel, bandwidth))  # (G, G)
        total = hsic if total is None else total + hsic
        batches += 1
    diag = total.diagonal()
    denom = torch.sqrt(diag[:, None] * diag[None, :])
    # a constant layer (HSIC_ii = 0: timm zero-inits each block's last BatchNorm) has CKA 0
    return torch.where(denom > 0, total / denom, 0.0), batches, skipped


def _modules_with_hooks(members):
    return [name for member in members for name, module in member.named_modules()
            if module._forward_hooks or module._forward_pre_hooks]


# --- evaluate() against a direct computation ---------------------------------------------------


@pytest.mark.parametrize("layers, kernel, bandwidth", [
    (None, "linear", 0.5),
    (["layer*"], "linear", 0.5),
    ([["layer1", "layer3"], ["act1", "layer2.0.conv1", "layer4", "fc"], None], "linear", 0.5),
    (None, "rbf", 0.5),
    ([["layer2", "global_pool"], ["layer?"], ["act1", "fc"]], "rbf", 2.0),
], ids=["default", "layer*", "per-member", "rbf", "rbf-per-member"])
def test_cka_equals_direct_computation(members, small, layers, kernel, bandwidth):
    block = _rep(members, small, layers=layers, cka_kernel=kernel, rbf_bandwidth=bandwidth)
    if layers is None:
        expected_layers = [STAGES] * 3
    elif layers == ["layer*"]:
        expected_layers = [[n for n, _ in m.model.named_modules() if n.startswith("layer")]
                           for m in members]
    else:
        expected_layers = [STAGES if ls is None
                           else ["layer1", "layer2", "layer3", "layer4"] if ls == ["layer?"]
                           else ls for ls in layers]
    assert block["layers"] == expected_layers
    assert block["names"] == [f"{m.name}/{layer}" for m, ls in zip(members, expected_layers)
                              for layer in ls]
    assert block["members"] == ["m0", "m1", "m2"]
    assert block["kernel"] == kernel
    assert block["bandwidth"] == (bandwidth if kernel == "rbf" else None)

    ref, batches, skipped = direct_cka(members, small, expected_layers, 10, kernel, bandwidth)
    assert (block["batches"], block["skipped_samples"]) == (batches, skipped) == (2, 3)
    cka = torch.tensor(block["cka"], dtype=torch.float64)
    g = sum(len(ls) for ls in expected_layers)
    assert cka.shape == (g, g)
    assert torch.allclose(cka, ref, rtol=0, atol=1e-9), float((cka - ref).abs().max())
    constant = [i for i, name in enumerate(block["names"]) if name.endswith(".bn2")]
    assert (len(constant) > 0) == (layers == ["layer*"])  # zero-init BN: zero features
    diagonal = torch.ones(g, dtype=torch.float64)
    diagonal[constant] = 0.0
    assert torch.allclose(cka.diagonal(), diagonal, rtol=0, atol=1e-12)
    assert torch.equal(cka, cka.T)
    off = cka[~torch.eye(g, dtype=torch.bool)]
    assert float(off.min()) < 0.99  # random members are not all alike: the check has teeth


def test_identical_copy_has_cka_one_at_every_depth(members, small):
    twin = copy.deepcopy(members[0])
    twin.info = dataclasses.replace(twin.info, name="m0-copy")
    block = _rep([members[0], twin], small)
    assert block["members"] == ["m0", "m0-copy"] and block["layers"] == [STAGES, STAGES]
    cka = torch.tensor(block["cka"], dtype=torch.float64)  # (10, 10)
    cross, own = cka[:5, 5:], cka[:5, :5]
    assert torch.allclose(cross.diagonal(), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(cross, own, rtol=0, atol=1e-12)  # the copy's layers are the original's
    assert [row["mean_cross_member_cka"] for row in block["by_depth"]] == pytest.approx(
        [1.0] * 5, abs=1e-12)
    assert block["mean_cross_member_cka"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("batch_size, batches, skipped", [
    (10, 2, 3), (4, 5, 3), (5, 4, 3), (20, 1, 3), (23, 1, 0), (12, 2, 0), (64, 1, 0),
])
def test_batches_and_skipped_samples(members, small, batch_size, batches, skipped):
    block = _rep(members[:2], small, batch_size)
    assert (block["batches"], block["skipped_samples"]) == (batches, skipped)
    ref, _, _ = direct_cka(members[:2], small, [STAGES] * 2, batch_size)
    assert torch.allclose(torch.tensor(block["cka"], dtype=torch.float64), ref, rtol=0, atol=1e-9)


def test_the_table_has_a_row_per_depth_and_the_skipped_samples(members, small):
    report = _report(members[:2], small, representation=True)
    buf = io.StringIO()
    render_eval(report, file=buf)
    text = buf.getvalue()
    assert "representation similarity (minibatch CKA, linear)" in text
    assert "(2 batches; 3 samples skipped in batches under 4 samples)" in text
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()]
    rows = [c for c in cells if len(c) == 4 and c[0].isdigit()]  # depth, m0, m1, mean
    assert rows == [[str(row["depth"]), *row["layers"], f"{row['mean_cross_member_cka']:.3f}"]
                    for row in report["representation"]["by_depth"]]


@pytest.mark.parametrize("n, batch_size", [(3, 10), (8, 3), (1, 1), (4, 2)])
def test_only_small_batches_raise(members, n, batch_size):
    data = Subset(digits_dataset("test"), range(n))
    with pytest.raises(DivfastError, match="--batch-size") as info:
        _report(members[:2], data, batch_size, representation=True)
    assert f"({n} samples seen)" in str(info.value)
    assert _modules_with_hooks(members) == []
    assert _report(members[:2], data, batch_size)["representation"] is None  # not asked: no error


# --- the depth table ---------------------------------------------------------------------------


def test_by_depth_with_different_layer_counts(members, small):
    """Default stages (5 layers) against three layers: 3 depths, the first, middle and last."""
    block = _rep(members[:2], small, layers=[None, ["layer2", "layer4", "fc"]])
    assert block["layers"] == [STAGES, ["layer2", "layer4", "fc"]]
    assert [row["layers"] for row in block["by_depth"]] == [
        ["act1", "layer2"], ["layer2", "layer4"], ["layer4", "fc"]]
    assert [row["depth"] for row in block["by_depth"]] == [0, 1, 2]
    assert [row["relative_depth"] for row in block["by_depth"]] == [0.0, 0.5, 1.0]
    cka = block["cka"]
    pairs = [(0, 5), (2, 6), (4, 7)]  # (member 0's index, 5 + member 1's index) in the G x G map
    assert [row["mean_cross_member_cka"] for row in block["by_depth"]] == [cka[i][j]
                                                                           for i, j in pairs]
    assert block["mean_cross_member_cka"] == pytest.approx(sum(cka[i][j] for i, j in pairs) / 3,
                                                           rel=1e-15)
    assert set(block["by_depth"][0]) == {"depth", "relative_depth", "layers",
                                         "mean_cross_member_cka"}


def test_by_depth_three_members_follows_depth_alignment(members, small):
    layers = [["layer1.0.*"], None, ["layer3", "fc"]]
    block = _rep(members, small, layers=layers)
    counts = [len(ls) for ls in block["layers"]]
    assert counts[1:] == [5, 2] and counts[0] > 5
    assert all(name.startswith("layer1.0.") for name in block["layers"][0])
    offsets = [0, counts[0], counts[0] + counts[1]]
    rows = block["by_depth"]
    assert len(rows) == 2
    for row, indices in zip(rows, depth_alignment(counts)):
        assert row["layers"] == [block["layers"][i][k] for i, k in enumerate(indices)]
        flat = [offsets[i] + k for i, k in enumerate(indices)]
        values = [block["cka"][flat[i]][flat[j]] for i in range(3) for j in range(i + 1, 3)]
        assert row["mean_cross_member_cka"] == pytest.approx(sum(values) / 3, rel=1e-14)
    assert rows[0]["layers"] == [block["layers"][0][0], "act1", "layer3"]
    assert rows[1]["layers"] == [block["layers"][0][-1], "layer4", "fc"]


def test_single_member_has_no_cross_member_cka(members, small):
    block = _rep(members[:1], small)
    assert block["members"] == ["m0"] and len(block["cka"]) == 5
    assert [row["layers"] for row in block["by_depth"]] == [[name] for name in STAGES]
    assert all(row["mean_cross_member_cka"] is None for row in block["by_depth"])
    assert block["mean_cross_member_cka"] is None


# --- the report --------------------------------------------------------------------------------


def test_block_keys_and_json(members, small):
    report = _report(members[:2], small, representation=True, cka_kernel="rbf", rbf_bandwidth=1)
    block = report["representation"]
    assert set(block) == BLOCK_KEYS
    assert block["kernel"] == "rbf" and block["bandwidth"] == 1
    text = json.dumps(report, allow_nan=False)  # raises on NaN or infinity
    assert json.loads(text) == report


def test_member_names_name_the_grams(members, small):
    block = _rep(members[:2], small, member_names=["first", "second"], layers=["layer1"])
    assert block["members"] == ["first", "second"]
    assert block["names"] == ["first/layer1", "second/layer1"]
    same = _rep([members[0], members[0]], small, layers=["layer1"])  # names alike: indices
    assert same["members"] == ["m0", "m0"] and same["names"] == ["0/layer1", "1/layer1"]


def test_representation_does_not_change_the_rest_of_the_report(members, small):
    """The hooks record only the prediction forward: the Saliency backward passes, hence the
    attribution block, and the prediction measures are those of a run without them."""
    both = _report(members[:2], small, attribution="saliency", representation=True)
    maps_only = _report(members[:2], small, attribution="saliency")
    rep_only = _report(members[:2], small, representation=True)
    assert both["attribution"]["diversity"] > 0
    assert json.dumps(both["attribution"]) == json.dumps(maps_only["attribution"])
    assert json.dumps(both["representation"]) == json.dumps(rep_only["representation"])
    for report in (both, maps_only):
        report.pop("attribution"), report.pop("representation")
    assert json.dumps(both, sort_keys=True) == json.dumps(maps_only, sort_keys=True)


class HookProbe(Dataset):
    """Wraps a dataset; records, per item fetched (between batches), how many forward hooks the
    members carry; can fail at one index."""

    def __init__(self, data, members, fail_at=None):
        self.data, self.members, self.fail_at, self.seen = data, members, fail_at, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("probe: failing on purpose")
        self.seen.append(len(_modules_with_hooks(self.members)))
        return self.data[i]


def test_hooks_only_while_asked(members, small, monkeypatch):
    assert _modules_with_hooks(members) == []
    probe = HookProbe(small, members)
    report = _report(members, probe, representation=True, attribution="saliency")
    assert report["representation"] is not None
    assert min(probe.seen) > 0  # hooks in place for the whole pass
    assert _modules_with_hooks(members) == []  # and gone after

    def no_capture(*args, **kwargs):
        raise AssertionError("GramCapture built with representation=False")

    monkeypatch.setattr(evaluate_module, "GramCapture", no_capture)
    probe = HookProbe(small, members)
    report = _report(members, probe, attribution="saliency", layers=["nomatch*"],
                     cka_kernel="rbf")
    assert report["representation"] is None
    assert probe.seen and max(probe.seen) == 0
    assert _modules_with_hooks(members) == []


def test_hooks_removed_after_an_error_mid_pass(members, small):
    probe = HookProbe(small, members, fail_at=15)  # in the second batch
    with pytest.raises(RuntimeError, match="failing on purpose"):
        _report(members, probe, representation=True, layers=["layer*"])
    assert max(probe.seen) > 0 and _modules_with_hooks(members) == []

    x, y = digits_dataset("test").tensors
    bad_labels = TensorDataset(x[:12], torch.cat([y[:8], torch.full((4,), 99)]))
    with pytest.raises(DivfastError, match="labels outside"):
        _report(members, bad_labels, batch_size=8, representation=True)
    assert _modules_with_hooks(members) == []

    broken = copy.deepcopy(members[1])
    with torch.no_grad():
        broken.model.fc.weight.fill_(float("nan"))
    with pytest.raises(DivfastError, match="NaN or infinite logits"):
        _report([members[0], broken], small, representation=True)
    assert _modules_with_hooks([members[0], broken]) == []


@pytest.mark.parametrize("kwargs, flag", [
    ({"cka_kernel": "cosine"}, "--cka-kernel"),
    ({"cka_kernel": "rbf", "rbf_bandwidth": 0}, "--rbf-bandwidth"),
    ({"cka_kernel": "rbf", "rbf_bandwidth": -1.0}, "--rbf-bandwidth"),
    ({"cka_kernel": "rbf", "rbf_bandwidth": float("nan")}, "--rbf-bandwidth"),
    ({"cka_kernel": "rbf", "rbf_bandwidth": float("inf")}, "--rbf-bandwidth"),
    ({"cka_kernel": "rbf", "rbf_bandwidth": "0.5"}, "--rbf-bandwidth"),
    ({"cka_kernel": "rbf", "rbf_bandwidth": True}, "--rbf-bandwidth"),
    ({"layers": ["nomatch*"]}, "--layers"),
    ({"layers": []}, "--layers"),
    ({"layers": "layer1"}, "--layers"),
    ({"layers": [["layer1"], ["layer2"]]}, "--layers"),  # two lists for three members
])
def test_bad_options_name_the_flag(members, small, kwargs, flag):
    with pytest.raises(DivfastError, match=flag):
        _report(members, small, representation=True, **kwargs)
    assert _modules_with_hooks(members) == []


def test_unknown_layer_lists_the_available_names(members, small):
    with pytest.raises(DivfastError, match="available: conv1, conv1.0, ") as info:
        _report(members, small, representation=True, layers=[["layer1"], ["nomatch*"], None])
    assert "'nomatch*' matches no module of member m1" in str(info.value)


# --- the command line --------------------------------------------------------------------------


def invoke(args):
    return cli_invoke(CliRunner(), args)


N_CLI = 24  # images the CLI sees: its dataset cut to the first N_CLI (one batch at the default 128)


@pytest.fixture
def few_images(monkeypatch):
    """`divfast eval` on the first N_CLI images of the dataset it builds."""
    real = divfast.data.build_dataset

    def first_images(*args, **kwargs):
        ds = real(*args, **kwargs)
        sub = Subset(ds, range(N_CLI))
        sub.classes = ds.classes
        return sub

    monkeypatch.setattr(divfast.data, "build_dataset", first_images)
    return Subset(digits_dataset("test"), range(N_CLI))


@pytest.fixture
def drawn(monkeypatch):
    """The `pairs` of every draw_cka_maps call the CLI makes (the figure is still drawn)."""
    calls = []
    real_draw = divfast.report.draw_cka_maps
    monkeypatch.setattr(divfast.report, "draw_cka_maps",
                        lambda block, path, pairs="cross": calls.append(pairs)
                        or real_draw(block, path, pairs))
    return calls


def _eval_args(member_files, *extra):
    return ["eval", "--members", ",".join(member_files), "--no-progress", "--device", "cpu", *extra]


def test_cli_representation_writes_maps_and_table(member_files, tmp_path, few_images, drawn):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files, "--metrics", "representation", "--out", out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cka_maps.png", "report.json"]
    assert drawn == ["cross"]
    lines = result.stdout.splitlines()
    assert f"wrote {out / 'cka_maps.png'}" in lines and f"wrote {out / 'report.json'}" in lines
    assert "representation similarity (minibatch CKA, linear)" in result.stdout
    assert "│ attribution" not in result.stdout  # not listed in --metrics: off
    report = json.loads((out / "report.json").read_text())
    assert report["attribution"] is None
    block = report["representation"]
    assert set(block) == BLOCK_KEYS
    assert block["members"] == ["m0", "m1"] and block["layers"] == [STAGES, STAGES]
    assert (block["batches"], block["skipped_samples"]) == (1, 0)
    assert f"mean cross-member CKA over depths: {block['mean_cross_member_cka']:.3f} (1 batches)" \
        in result.stdout

    from PIL import Image

    with Image.open(out / "cka_maps.png") as img:
        assert img.format == "PNG" and img.size[0] > 0


def test_cli_metrics_all(member_files, tmp_path, few_images):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files, "--metrics", "all", "--out", out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["attributions.png", "cka_maps.png",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["attribution"]["method"] == "saliency"
    assert report["representation"]["kernel"] == "linear"
    assert "│ attribution" in result.stdout and "representation similarity" in result.stdout


def test_cli_metrics_prediction_only(member_files, tmp_path, few_images):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files, "--metrics", " prediction ", "--out", out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["attribution"] is None and report["representation"] is None
    assert "representation similarity" not in result.stdout


@pytest.mark.parametrize("metrics", ["bogus", "", ",", "prediction,bogus", "all,prediction",
                                     "Representation"])
def test_cli_bad_metrics(member_files, tmp_path, metrics):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files, "--metrics", metrics, "--out", out))
    assert_user_error(result, "--metrics")
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("extra", [["--rbf-bandwidth", "0"], ["--rbf-bandwidth", "-1"],
                                   ["--rbf-bandwidth", "nan"], ["--rbf-bandwidth", "inf"],
                                   ["--rbf-bandwidth", "wide"]],
                         ids=lambda v: v[-1])
def test_cli_bad_rbf_bandwidth(member_files, tmp_path, extra):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files, "--metrics", "representation", "--cka-kernel", "rbf",
                               "--out", out, *extra))
    assert_user_error(result, "--rbf-bandwidth")
    assert not out.exists()


def test_cli_bad_kernel(member_files, tmp_path):
    result = invoke(_eval_args(member_files, "--metrics", "representation", "--cka-kernel", "cosine"))
    assert_user_error(result, "--cka-kernel")


@pytest.mark.parametrize("layers", ["nomatch*", "layer1,nomatch*", "", ","])
def test_cli_bad_layers(member_files, tmp_path, few_images, layers):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files, "--metrics", "representation", "--layers", layers,
                               "--out", out))
    assert_user_error(result, "--layers")
    if layers.strip(","):
        assert "available: conv1, conv1.0, " in result.stderr and "layer1" in result.stderr
    assert not out.exists()  # refused before --out is made


def test_cli_json_matches_the_library(member_files, few_images):
    opts = ["--metrics", "representation", "--cka-kernel", "rbf", "--rbf-bandwidth", "1.5",
            "--layers", "layer*,fc", "--batch-size", "10"]
    result = invoke(_eval_args(member_files, "--json", *opts))
    assert result.exit_code == 0, result.output

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    report = json.loads(result.stdout, parse_constant=no_constants)  # stdout is the JSON alone
    block = report["representation"]
    assert block["kernel"] == "rbf" and block["bandwidth"] == 1.5
    assert all(ls[-1] == "fc" and all(n.startswith("layer") for n in ls[:-1])
               for ls in block["layers"])
    values = [v for row in block["cka"] for v in row] + [
        row["mean_cross_member_cka"] for row in block["by_depth"]] + [
        block["mean_cross_member_cka"]]
    assert all(isinstance(v, float) and math.isfinite(v) and -1 <= v <= 1 for v in values)
    assert (block["batches"], block["skipped_samples"]) == (3, 0)  # 10, 10, 4

    from divfast.data import load_members

    lib = _report(load_members(member_files), few_images, representation=True, cka_kernel="rbf",
                  rbf_bandwidth=1.5, layers=["layer*", "fc"], gram_dtype=torch.float32)
    assert json.dumps(lib["representation"]) == json.dumps(block)  # the CLI's default: float32


def test_float32_gram_products_agree_with_float64(members, small):
    """The default float32 Gram products (features centred first) against float64 ones."""
    for kernel in ("linear", "rbf"):
        f32 = _report(members, small, representation=True, layers=["*"], cka_kernel=kernel,
                      gram_dtype=torch.float32)["representation"]
        f64 = _report(members, small, representation=True, layers=["*"], cka_kernel=kernel,
                      gram_dtype=torch.float64)["representation"]
        diff = (torch.tensor(f32["cka"]) - torch.tensor(f64["cka"])).abs().max()
        assert diff < 1e-6, (kernel, float(diff))


def test_cli_single_member_draws_its_self_map(member_files, tmp_path, few_images, drawn):
    out = tmp_path / "out"
    result = invoke(_eval_args(member_files[:1], "--metrics", "representation", "--out", out))
    assert result.exit_code == 0, result.output
    assert drawn == ["all"]
    assert sorted(p.name for p in out.iterdir()) == ["cka_maps.png", "report.json"]
    assert "representation similarity (minibatch CKA," in result.stdout  # a narrow table wraps
    block = json.loads((out / "report.json").read_text())["representation"]
    assert block["members"] == ["m0"] and block["mean_cross_member_cka"] is None


def test_a_glob_drops_modules_the_forward_never_calls(members, small):
    """`--layers '*'` on a model with a module its forward never calls (a fused ViT's attn_drop, a
    disabled drop path): that layer is dropped with a warning; an exact name that never runs is an
    error."""
    import copy

    member = copy.deepcopy(members[0])
    member.model.unused = torch.nn.Dropout(0.1)  # registered, never called
    with pytest.warns(RuntimeWarning, match=r"dropped layer\(s\).*unused"):
        block = _report([member, members[1]], small, representation=True,
                        layers=[["*"], ["layer1"]])["representation"]
    assert "unused" not in block["layers"][0] and block["layers"][1] == ["layer1"]
    assert len(block["cka"]) == len(block["layers"][0]) + 1
    with pytest.raises(DivfastError, match=r"did not run"):
        _report([member], small, representation=True, layers=["unused", "layer1"])
