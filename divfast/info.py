"""Facts about this install: torch, the compiled extension, its kernels, the device seen."""

from __future__ import annotations

import torch

import divfast
from divfast._ops import _load


def collect_info() -> dict:
    try:
        from divfast import _build_info as build

        built = {"torch_version": build.TORCH_VERSION, "with_cuda": build.WITH_CUDA,
                 "cuda_archs": build.CUDA_ARCHS, "cuda_home": build.CUDA_HOME}
    except ImportError:
        built = {"torch_version": None, "with_cuda": False, "cuda_archs": "", "cuda_home": None}
    loaded = _load.load_extension()
    kernels = {op: {"cpu": _load.has_kernel(op, "CPU"), "cuda": _load.has_kernel(op, "CUDA")}
               for op in _load.OPS}
    cuda = torch.cuda.is_available()
    cpu_path = None
    if loaded:
        from divfast import _C

        cpu_path = _C.cpu_path()  # "avx512", "avx2" or "portable" (see DIVFAST_CPU_BASELINE)
    return {
        "divfast": divfast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": loaded,
        "extension_error": _load.load_error(),
        "built": built,
        "kernels": kernels,
        "cpu_path": cpu_path,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda_available": cuda,
        "cpu_threads": torch.get_num_threads(),
    }
