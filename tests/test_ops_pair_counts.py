"""``divfast::pair_counts``: the compiled kernel against the pure-PyTorch reference.

Every test draws fresh random inputs from the seeded ``gen`` fixture and runs on each device of the
``device`` fixture. The reference (divfast/_ops/reference.py) is the oracle for the four outputs;
``correct`` is also checked against ``torch.argmax(x, -1) == target`` directly, so a tie rule shared
by a wrong kernel and a wrong reference would still be caught.
"""

import glob
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import divfast._ops._load as load
import divfast._ops.pair_counts as pc_module
from divfast._ops import reference

REPO = Path(__file__).resolve().parents[1]
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernel(*args):
    assert load.load_extension(), f"divfast._C is not loaded: {load.load_error()}"
    return torch.ops.divfast.pair_counts(*args)


def assert_same(got, want):
    names = ("counts", "agreement", "histogram", "correct")
    assert len(got) == len(want) == 4
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.device == w.device, (name, g.device, w.device)
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs:\n{g}\n{w}"


def assert_invariants(out, m, b, correct_want):
    """Checks the outputs against facts that need no reference: margins, symmetry, argmax."""
    counts, agreement, histogram, correct = out
    assert counts.shape == (m, m, 2, 2) and counts.dtype == torch.int64
    assert agreement.shape == (m, m) and agreement.dtype == torch.int64
    assert histogram.shape == (m + 1,) and histogram.dtype == torch.int64
    assert correct.shape == (m, b) and correct.dtype == torch.bool
    assert torch.equal(correct.cpu(), correct_want.cpu())
    c = correct.cpu().to(torch.int64)
    flat = counts.cpu().reshape(m, m, 4)
    n11 = c @ c.T
    assert torch.equal(flat[..., 0], n11)
    assert torch.equal(flat[..., 1], c.sum(1)[:, None] - n11)
    assert torch.equal(flat[..., 2], c.sum(1)[None, :] - n11)
    assert torch.equal(flat.sum(-1), torch.full((m, m), b))
    assert torch.equal(agreement.cpu(), agreement.cpu().T)
    assert torch.equal(agreement.cpu().diagonal(), torch.full((m,), b))
    assert torch.equal(histogram.cpu(), torch.bincount(c.sum(0), minlength=m + 1))


def random_logits(m, b, c, dtype, gen, device, scale=3.0):
    x = torch.randn(m, b, c, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def random_target(b, c, gen, device):
    return torch.randint(0, c, (b,), generator=gen).to(device)


def check_logits(x, t, num_classes=-1):
    m, b = x.shape[:2]
    got = kernel(x, t, num_classes)
    want = reference.pair_counts(x, t, num_classes)
    assert_same(got, want)
    want_correct = torch.argmax(x, dim=-1) == t if b else torch.zeros(m, 0, dtype=torch.bool)
    assert_invariants(got, m, b, want_correct)
    return got


SHAPES = [  # (M, B, C)
    (1, 0, 3),
    (3, 0, 1),
    (1, 1, 1),
    (2, 1, 1000),
    (1, 63, 17),
    (3, 63, 17),
    (4, 64, 3),
    (5, 65, 3),
    (2, 64, 1000),
    (20, 200, 17),
    (7, 129, 8),
    (6, 200, 33),
    (3, 1500, 5),  # > 8 tiles: several threads, merged accumulators
]


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_logits_match_reference(device, gen, dtype, shape):
    m, b, c = shape
    x = random_logits(m, b, c, dtype, gen, device)
    t = random_target(b, c, gen, device)
    check_logits(x, t)
    check_logits(x, t, c)  # num_classes given explicitly


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_logits_mostly_correct_members(device, gen, dtype):
    # Boost the target logit so correctness is common and varies per member (all cells non-trivial).
    m, b, c = 6, 300, 11
    t = random_target(b, c, gen, device)
    x = torch.randn(m, b, c, generator=gen, dtype=torch.float64).to(device)
    boost = torch.linspace(0.0, 3.0, m, dtype=torch.float64, device=device)[:, None]
    x[:, torch.arange(b, device=device), t] += boost
    out = check_logits(x.to(dtype), t)
    hist = out[2].cpu()
    assert hist[0] > 0 and hist[-1] > 0 and hist[1:-1].sum() > 0


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_non_contiguous_logits(device, gen, dtype):
    m, b, c = 5, 131, 40
    base = random_logits(b, m, 2 * c, dtype, gen, device)  # (B, M, 2C)
    x = base.transpose(0, 1)[:, :, ::2]  # (M, B, C), strided in every dimension
    assert not x.is_contiguous()
    t_base = random_target(3 * b, c, gen, device)
    t = t_base[::3]
    assert not t.is_contiguous()
    check_logits(x, t)
    # A slice along B that starts mid-tile, and a slice along members.
    check_logits(x[1:4, 7:100], t[7:100])
    # Expanded (stride-0) logits: every member identical.
    row = random_logits(1, b, c, dtype, gen, device)
    got = check_logits(row.expand(m, b, c), t)
    assert torch.equal(got[1].cpu(), torch.full((m, m), b))


def test_non_contiguous_labels(device, gen):
    m, b, c = 4, 150, 9
    labels = torch.randint(0, c, (b, m), generator=gen).to(device).T  # (M, B), transposed
    t = torch.randint(0, c, (2 * b,), generator=gen).to(device)[1::2]
    assert not labels.is_contiguous() and not t.is_contiguous()
    for nc in (-1, c):
        got = kernel(labels, t, nc)
        assert_same(got, reference.pair_counts(labels, t, nc))
        assert_invariants(got, m, b, labels == t)


def tie_cases(gen):
    """(name, logits float64 (M, B, C)) with ties, infinities and signed zeros."""
    inf = float("inf")
    cases = []
    # Few distinct values: ties everywhere, across the 32-wide, 8-wide and scalar parts of a row.
    for c in (2, 7, 17, 40, 100):
        cases.append((f"rounded_c{c}", torch.randint(-1, 2, (4, 130, c), generator=gen).double()))
    cases.append(("all_equal", torch.zeros(3, 70, 37, dtype=torch.float64)))
    cases.append(("all_minus_inf", torch.full((3, 70, 37), -inf, dtype=torch.float64)))
    cases.append(("all_minus_inf_c5", torch.full((2, 9, 5), -inf, dtype=torch.float64)))
    x = torch.full((2, 66, 45), -inf, dtype=torch.float64)
    x[0, :, 44] = 1.0  # the only finite value is the last one (scalar tail)
    x[1, :, 33] = -5.0  # in the 8-wide loop
    cases.append(("one_finite", x))
    x = torch.randn(3, 80, 50, generator=gen, dtype=torch.float64)
    x[:, ::2, 10] = inf
    x[:, ::3, 41] = inf  # two +inf: the first wins
    x[0, ::5, :] = inf
    cases.append(("plus_inf", x))
    x = torch.full((2, 64, 20), -1.0, dtype=torch.float64)
    x[:, :, 3] = -0.0
    x[:, :, 12] = 0.0  # -0.0 == 0.0: index 3 wins
    x[1, :, 0] = 0.0
    cases.append(("signed_zero", x))
    # Denormals: a flush-to-zero build (e.g. CUDA --use_fast_math) would see ties that are not there.
    tiny = torch.finfo(torch.float32).smallest_normal
    x = torch.zeros(2, 70, 9, dtype=torch.float64)
    x[:, :, 2] = tiny / 4  # float32 denormal
    x[:, :, 5] = tiny / 2  # the larger denormal: index 5 must win
    x[1, :, 7] = -tiny / 2
    cases.append(("denormals", x))
    return cases


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
def test_ties_resolve_to_first_max(device, gen, dtype):
    for name, x64 in tie_cases(gen):
        x = x64.to(dtype).to(device)
        m, b, c = x.shape
        # Targets drawn among the maxima of each row, so the tie rule decides correctness; plus the
        # last maximum, which a "last max wins" kernel would get right and torch.argmax wrong.
        xf = x.double().cpu()
        is_max = xf == xf.max(dim=-1, keepdim=True).values  # (M, B, C)
        last = c - 1 - is_max[0].flip(-1).to(torch.int8).argmax(-1)  # (B,) member 0's last max
        random_t = torch.randint(0, c, (b,), generator=gen)
        for t in (last, random_t, torch.argmax(xf[0], dim=-1)):
            t = t.to(device)
            got = kernel(x, t, -1)
            assert_same(got, reference.pair_counts(x, t, -1))
            first = torch.argmax(x, dim=-1)
            assert torch.equal(got[3].cpu(), (first == t).cpu()), name
            assert_invariants(got, m, b, first == t)


@pytest.mark.parametrize("shape", [(1, 0), (1, 1), (2, 63), (3, 64), (5, 65), (20, 200), (4, 1100)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("num_classes", [-1, 1, 3, 17])
def test_labels_match_reference(device, gen, shape, num_classes):
    m, b = shape
    hi = num_classes if num_classes > 0 else 5
    labels = torch.randint(0, hi, (m, b), generator=gen).to(device)
    t = torch.randint(0, hi, (b,), generator=gen).to(device)
    got = kernel(labels, t, num_classes)
    assert_same(got, reference.pair_counts(labels, t, num_classes))
    assert_invariants(got, m, b, labels == t)


def test_labels_unbounded_without_num_classes(device, gen):
    # num_classes=-1 checks only that labels are non-negative: large labels are fine.
    m, b = 3, 100
    labels = torch.randint(0, 3, (m, b), generator=gen).to(device) + 10**12
    t = torch.randint(0, 3, (b,), generator=gen).to(device) + 10**12
    got = kernel(labels, t, -1)
    assert_same(got, reference.pair_counts(labels, t, -1))
    assert_invariants(got, m, b, labels == t)


def test_known_counts(device):
    # Two members, four samples: (correct_0, correct_1) = (1,1), (1,0), (0,1), (0,0).
    labels = torch.tensor([[0, 1, 9, 9], [0, 8, 2, 7]], device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    for fn in (kernel, reference.pair_counts):
        counts, agreement, hist, correct = fn(labels, t, -1)
        assert counts[0, 1].flatten().tolist() == [1, 1, 1, 1]
        assert counts[0, 0].flatten().tolist() == [2, 0, 0, 2]
        assert counts[1, 1].flatten().tolist() == [2, 0, 0, 2]
        assert agreement.tolist() == [[4, 1], [1, 4]]
        assert hist.tolist() == [1, 2, 1]
        assert correct.tolist() == [[True, True, False, False], [True, False, True, False]]
    # Asymmetric pair: member 0 right on 3 samples, member 1 on 1 of them.
    labels = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 0]], device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    counts = kernel(labels, t, 4)[0]
    assert counts[0, 1].flatten().tolist() == [1, 2, 0, 1]  # N11, N10, N01, N00
    assert counts[1, 0].flatten().tolist() == [1, 0, 2, 1]


# --- errors: same exception type from kernel and reference, message naming the argument ---------


def error_cases(device, gen):
    """(id, args, exception type, argument named in the message)."""
    d = device
    x = torch.randn(3, 10, 5, generator=gen).to(d)
    t = torch.randint(0, 5, (10,), generator=gen).to(d)
    labels = torch.randint(0, 5, (3, 10), generator=gen).to(d)
    cases = []
    for where in (0, 9):
        bad = t.clone()
        bad[where] = -1
        cases.append((f"target_negative_{where}", (x, bad, -1), ValueError, "target"))
        bad = t.clone()
        bad[where] = 5
        cases.append((f"target_ge_C_{where}", (x, bad, -1), ValueError, "target"))
        for value in (-3, 5):
            bad = t.clone()
            bad[where] = value
            cases.append((f"labels_target_{value}_{where}", (labels, bad, 5), ValueError, "target"))
        bad = labels.clone()
        bad[2, where] = 5
        cases.append((f"labels_ge_nc_{where}", (bad, t, 5), ValueError, "predictions"))
        bad = labels.clone()
        bad[1, where] = -1
        cases.append((f"labels_negative_{where}", (bad, t, 5), ValueError, "predictions"))
        cases.append((f"labels_negative_unchecked_{where}", (bad, t, -1), ValueError,
                      "predictions"))
    cases.append(("target_negative_labels_unchecked", (labels, -t - 1, -1), ValueError, "target"))
    big = torch.full((2, 200), 1, device=d)
    tb = torch.ones(200, dtype=torch.long, device=d)
    tb[150] = 7  # out of range in the fourth tile only
    cases.append(("target_late_tile", (big, tb, 3), ValueError, "target"))
    for dtype in LOGIT_DTYPES:
        for c, pos in ((5, 4), (41, 0), (41, 5), (41, 31), (41, 32), (41, 39), (41, 40), (1, 0)):
            xn = torch.randn(3, 70, c, generator=gen).to(dtype).to(d)
            xn[2, 66, pos] = float("nan")  # last member, second tile
            tn = torch.randint(0, c, (70,), generator=gen).to(d)
            name = f"nan_{dtype}_c{c}_at{pos}"
            cases.append((name, (xn, tn, -1), ValueError, "predictions"))
    xn = x.clone()
    xn[:] = float("nan")
    cases.append(("all_nan", (xn, t, -1), ValueError, "predictions"))
    cases.append(("mismatched_B", (x, t[:9], -1), ValueError, "target"))
    cases.append(("mismatched_B_labels", (labels, t[:0], -1), ValueError, "target"))
    cases.append(("logits_int", (x.to(torch.int32), t, -1), TypeError, "predictions"))
    cases.append(("logits_int64", (x.to(torch.int64), t, -1), TypeError, "predictions"))
    cases.append(("labels_float", (labels.float(), t, -1), TypeError, "predictions"))
    cases.append(("labels_int32", (labels.int(), t, -1), TypeError, "predictions"))
    cases.append(("target_float", (x, t.float(), -1), TypeError, "target"))
    cases.append(("target_int32", (x, t.int(), -1), TypeError, "target"))
    cases.append(("target_2d", (x, t[None], -1), ValueError, "target"))
    cases.append(("target_0d", (x, t[0], -1), ValueError, "target"))
    cases.append(("predictions_1d", (t, t, -1), ValueError, "predictions"))
    cases.append(("predictions_4d", (x[None], t, -1), ValueError, "predictions"))
    cases.append(("no_members", (x[:0], t, -1), ValueError, "predictions"))
    cases.append(("no_classes", (x[..., :0], t, -1), ValueError, "predictions"))
    cases.append(("num_classes_ne_C", (x, t, 4), ValueError, "num_classes"))
    cases.append(("num_classes_ne_C_big", (x, t, 6), ValueError, "num_classes"))
    cases.append(("labels_num_classes_zero", (labels, t, 0), ValueError, "num_classes"))
    cases.append(("labels_num_classes_negative", (labels, t, -7), ValueError, "num_classes"))
    return cases


def test_errors_name_the_argument(device, gen):
    for name, args, exc, arg in error_cases(device, gen):
        for fn in (kernel, reference.pair_counts):
            with pytest.raises(exc) as info:
                fn(*args)
            assert type(info.value) is exc, (name, fn, type(info.value))
            assert f"`{arg}`" in str(info.value), (name, fn, str(info.value))


def test_errors_leave_no_partial_state(device, gen):
    # A failed call must not poison the next (e.g. leftover error flags or accumulators).
    x = torch.randn(3, 100, 6, generator=gen).to(device)
    t = torch.randint(0, 6, (100,), generator=gen).to(device)
    bad = x.clone()
    bad[1, 50, 2] = float("nan")
    with pytest.raises(ValueError):
        kernel(bad, t, -1)
    check_logits(x, t)


# --- registration ------------------------------------------------------------------------------


def test_fake_shapes(gen):
    kernel(torch.zeros(1, 1, 1), torch.zeros(1, dtype=torch.long), -1)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 33, 6)
        t = torch.empty(33, dtype=torch.long)
        counts, agreement, hist, correct = torch.ops.divfast.pair_counts(x, t, -1)
        assert counts.shape == (4, 4, 2, 2) and counts.dtype == torch.int64
        assert agreement.shape == (4, 4) and hist.shape == (5,) and correct.shape == (4, 33)
        assert correct.dtype == torch.bool
        labels = torch.empty(2, 7, dtype=torch.long)
        out = torch.ops.divfast.pair_counts(labels, torch.empty(7, dtype=torch.long), 3)
        assert [tuple(o.shape) for o in out] == [(2, 2, 2, 2), (2, 2), (3,), (2, 7)]


def test_compiled_call_matches_eager(gen):
    x = torch.randn(3, 70, 5, generator=gen)
    t = torch.randint(0, 5, (70,), generator=gen)
    fn = torch.compile(lambda a, b: torch.ops.divfast.pair_counts(a, b, -1), backend="aot_eager",
                       fullgraph=True)
    assert_same(fn(x, t), kernel(x, t, -1))


# --- which implementation runs -----------------------------------------------------------------


def test_extension_is_the_one_tested():
    if os.environ.get("DIVFAST_REQUIRE_EXTENSION") != "1":
        # Without the requirement the fallback is legal, but the loader must say why it is taken.
        if not load.load_extension():
            assert load.load_error()
        return
    assert load.load_extension() is True
    assert load.load_error() is None
    assert load.has_kernel("pair_counts", "CPU") is True
    import divfast._C

    so = Path(divfast._C.__file__).resolve()
    assert so.is_relative_to(REPO), f"divfast._C comes from {so}, not from the repo {REPO}"
    assert so.parent == REPO / "divfast"
    assert load.use_kernel("pair_counts", torch.device("cpu")) is True


def _toolkit_present() -> bool:
    """setup.py's rule: a CUDA build of torch plus an nvcc (CUDA_HOME, /usr/local/cuda*, PATH)."""
    if os.environ.get("DIVFAST_NO_CUDA") == "1" or not torch.version.cuda:
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             *glob.glob("/usr/local/cuda*")]
    found = any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes)
    return found or shutil.which("nvcc") is not None


def test_cuda_kernels_compiled_and_registered():
    """Where torch is a CUDA build and a toolkit exists, the CUDA kernels must be compiled and
    registered, GPU or not; CI (DIVFAST_REQUIRE_CUDA_BUILD=1) also requires that toolkit."""
    import divfast._build_info as build_info

    expected = _toolkit_present()
    if os.environ.get("DIVFAST_REQUIRE_CUDA_BUILD") == "1":
        assert expected, "DIVFAST_REQUIRE_CUDA_BUILD=1 but no CUDA toolkit / CUDA torch is present"
    assert build_info.WITH_CUDA is expected, "the build disagrees with setup.py's CUDA rule"
    if expected:
        assert build_info.CUDA_ARCHS
    for op in load.OPS:
        assert load.has_kernel(op, "CUDA") is expected, f"divfast::{op}: CUDA kernel registration"


def test_wrapper_calls_the_kernel(monkeypatch, gen):
    x = torch.randn(3, 70, 5, generator=gen)
    t = torch.randint(0, 5, (70,), generator=gen)
    want = reference.pair_counts(x, t, -1)
    if load.has_kernel("pair_counts", "CPU"):
        def boom(*a, **k):
            raise AssertionError("the reference ran although a CPU kernel is registered")

        monkeypatch.setattr(reference, "pair_counts", boom)
    assert_same(pc_module.pair_counts(x, t), want)


def disable_kernels(monkeypatch):
    """Pretends the extension has no kernels, with the fallback allowed and the warning unsent."""
    monkeypatch.delenv("DIVFAST_REQUIRE_EXTENSION", raising=False)
    monkeypatch.setattr(load, "has_kernel", lambda op, key: False)
    monkeypatch.setitem(load._STATE, "warned", False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the compiled kernel ran on the fallback path")

    monkeypatch.setattr(torch.ops.divfast, "pair_counts", must_not_run, raising=False)


def test_fallback_matches_kernel(device, gen, monkeypatch):
    x = random_logits(4, 130, 9, torch.float32, gen, device)
    t = random_target(130, 9, gen, device)
    labels = torch.randint(0, 9, (4, 130), generator=gen).to(device)
    want_logits = kernel(x, t, -1)
    want_labels = kernel(labels, t, 9)
    disable_kernels(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got_logits = pc_module.pair_counts(x, t)
        got_labels = pc_module.pair_counts(labels, t, 9)
    assert_same(got_logits, want_logits)
    assert_same(got_labels, want_labels)


def test_fallback_warns_once(gen, monkeypatch):
    disable_kernels(monkeypatch)
    x = torch.randn(2, 10, 3, generator=gen)
    t = torch.randint(0, 3, (10,), generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pc_module.pair_counts(x, t)
        pc_module.pair_counts(x, t)
        assert load.use_kernel("pair_counts", torch.device("cpu")) is False
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "reference" in str(runtime[0].message)
    assert load._STATE["warned"] is True


def test_fallback_refused_when_extension_required(monkeypatch, gen):
    monkeypatch.setenv("DIVFAST_REQUIRE_EXTENSION", "1")
    monkeypatch.setattr(load, "has_kernel", lambda op, key: False)
    monkeypatch.setitem(load._STATE, "warned", False)
    x = torch.randn(2, 10, 3, generator=gen)
    t = torch.randint(0, 3, (10,), generator=gen)
    with pytest.raises(RuntimeError, match="DIVFAST_REQUIRE_EXTENSION"):
        pc_module.pair_counts(x, t)
    assert load._STATE["warned"] is False
