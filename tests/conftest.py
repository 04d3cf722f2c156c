"""Shared fixtures: every op test runs on each device present.

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
