"""Shared fixtures: every op test runs on each device present; the random members the eval tests
share; a counter of member loads and forward passes.

DIVFAST_REQUIRE_CUDA=1 makes a missing GPU fail instead of skip; DIVFAST_REQUIRE_EXTENSION=1 (set by
CI) makes a missing compiled extension fail instead of falling back to the reference.
"""

import os

import pytest
import torch


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    elif os.environ.get("DIVFAST_REQUIRE_CUDA") == "1":
        devices.append("cuda")  # the test then fails loudly in the fixture below
    return devices


@pytest.fixture(params=_devices())
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.fail("DIVFAST_REQUIRE_CUDA=1 but no CUDA device is visible")
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test so failures reproduce."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def members():
    """Three random 10-class members; the third sees the images at 24 px (its own resize)."""
    from divfast.data.members import create_member

    classes = [str(d) for d in range(10)]
    out = []
    for seed, size in [(0, 32), (1, 32), (2, 24)]:
        torch.manual_seed(seed)
        out.append(create_member("resnet10t", 10, (3, size, size), name=f"m{seed}",
                                 class_names=classes).eval())
    return out


@pytest.fixture(scope="module")
def member_files(tmp_path_factory, members):
    """The first two of `members`, saved as checkpoint files (for the CLI)."""
    from divfast.data import save_member

    folder = tmp_path_factory.mktemp("members")
    paths = []
    for member in members[:2]:
        path = str(folder / f"{member.name}.safetensors")
        save_member(member, path)
        paths.append(path)
    return paths


@pytest.fixture
def passes(monkeypatch):
    """Counts member loads and forward calls of everything that loads through
    divfast.data.members.load_member (the logits cache, the sweep's saliency pass)."""
    import divfast.data.members as members_module

    counts = {"loads": 0, "forwards": 0}
    real = members_module.load_member

    def counting_load(spec, device="cpu"):
        counts["loads"] += 1
        loaded = real(spec, device)
        loaded.register_forward_hook(lambda *_: counts.__setitem__("forwards",
                                                                   counts["forwards"] + 1))
        return loaded

    monkeypatch.setattr(members_module, "load_member", counting_load)
    return counts
