"""Checks every registered op must pass: registration (opcheck), fake shapes, kernel == reference."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from divfast._ops import _load
from op_registry import OPS

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def op(case):
    assert _load.load_extension(), _load.load_error()
    return getattr(torch.ops.divfast, case.name)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_every_compiled_op_is_registered_here():
    assert sorted(c.name for c in OPS) == sorted(_load.OPS)
    if _load.load_extension():
        for name in _load.OPS:
            assert hasattr(torch.ops.divfast, name)


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
def test_opcheck(case, device, gen):
    for args in case.samples(device, gen):
        result = torch.library.opcheck(op(case), args, test_utils=OPCHECK_UTILS)
        assert result == {u: "SUCCESS" for u in OPCHECK_UTILS}, result


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
def test_kernel_matches_reference(case, device, gen):
    for args in case.samples(device, gen):
        got, want = as_tuple(op(case)(*args)), as_tuple(case.reference(*args))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
            if case.exact:
                assert torch.equal(g, w)
            else:
                torch.testing.assert_close(g, w, **(case.tolerance or {}))


@pytest.mark.parametrize("case", OPS, ids=lambda c: c.name)
def test_fake_kernel_matches_real_shapes(case, gen):
    for args in case.samples(torch.device("cpu"), gen):
        real = as_tuple(op(case)(*args))
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = as_tuple(op(case)(*fake_args))
        assert [(f.shape, f.dtype) for f in fake] == [(r.shape, r.dtype) for r in real]
