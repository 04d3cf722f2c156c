"""Loads the compiled extension ``divfast._C`` once, or records why it could not.

Without the extension every op runs its pure-PyTorch reference (divfast/_ops/reference.py) and one
warning says so. ``DIVFAST_REQUIRE_EXTENSION=1`` turns a missing extension into an ImportError: CI sets
it so a broken build can never pass as a slow fallback.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_STATE: dict = {"loaded": None, "error": None, "warned": False}

OPS = ("pair_counts", "attribution_stats", "hsic", "ensemble_sweep")  # op families: divfast/_ops/<family>.py, csrc/{cpu,cuda}/<family>.*


def load_extension() -> bool:
    """Imports ``divfast._C`` (registering the ops); returns whether it is available."""
    if _STATE["loaded"] is None:
        try:
            from divfast import _C  # noqa: F401  (import runs the TORCH_LIBRARY registrations)

            _STATE["loaded"] = True
        except ImportError as exc:  # a missing or broken build: fall back, say why
            _STATE["loaded"] = False
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            if os.environ.get("DIVFAST_REQUIRE_EXTENSION") == "1":
                raise ImportError(
                    "DIVFAST_REQUIRE_EXTENSION=1 but divfast._C could not be imported: "
                    f"{_STATE['error']}"
                ) from exc
        if _STATE["loaded"]:  # fake kernels need the schemas: register them once, now
            for family in OPS:
                importlib.import_module(f"divfast._ops.{family}").register_fake_kernel()
    return bool(_STATE["loaded"])


def load_error() -> str | None:
    """Why the extension is unavailable, or None."""
    load_extension()
    return _STATE["error"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``divfast::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not load_extension():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"divfast::{op}", dispatch_key)


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether to call the compiled kernel for a tensor on ``device``; warns once when falling back."""
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else device.type.upper()
    if has_kernel(op, key):
        return True
    if os.environ.get("DIVFAST_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(
            f"DIVFAST_REQUIRE_EXTENSION=1 but divfast::{op} has no {key} kernel "
            f"({load_error() or 'the extension was built without it'})"
        )
    if not _STATE["warned"]:
        _STATE["warned"] = True
        reason = load_error() or f"no {key} kernel was compiled"
        warnings.warn(
            f"divfast: compiled kernels unavailable ({reason}); using the pure-PyTorch reference "
            "implementations, which are correct but slower.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
