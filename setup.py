"""Build divfast and its compiled extension ``divfast._C``.

The CPU kernels are always built. The CUDA kernels are built whenever the installed torch is a CUDA
build and a CUDA toolkit is found, whether or not a GPU is visible: a GPU-less builder must not ship a
CPU-only wheel by accident. Set ``DIVFAST_NO_CUDA=1`` to force a CPU-only build.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version_key(path):
    """/usr/local/cuda-13.0 -> (13, 0): numeric, so 13.0 sorts above 9.2."""
    tail = os.path.basename(path).split("-", 1)[-1]
    return tuple(int(p) if p.isdigit() else -1 for p in tail.split("."))


def _torch_cuda_version():
    """torch.version.cuda of the installed torch, read without importing torch.utils.cpp_extension
    (which reads CUDA_HOME at import time)."""
    try:
        import torch

        return torch.version.cuda
    except ImportError:
        return None


def _find_cuda_home():
    """The toolkit's own folder: the one whose bin/ holds the real nvcc.

    The nvcc first on PATH may be a wrapper script; torch's guess from it breaks linking, so follow
    the wrapper to the real binary and prefer an explicit CUDA_HOME, then the toolkit matching
    torch's CUDA version, then the newest installed one.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    candidates = sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    wanted = _torch_cuda_version()
    if wanted:
        candidates = [c for c in candidates if c.endswith(f"-{wanted}")] + candidates
    candidates.append("/usr/local/cuda")
    for home in candidates:
        nvcc = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(nvcc):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper: find the exec'd path
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    return os.path.dirname(os.path.dirname(token))
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _configure_cuda_env():
    """Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time."""
    if os.environ.get("DIVFAST_NO_CUDA") == "1":
        return None
    home = _find_cuda_home()
    if home is None:
        return None
    os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return home


CUDA_HOME = _configure_cuda_env()

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvidia_includes():
    """Headers of the pip-installed CUDA runtime (cuda_runtime_api.h, cublas, ...)."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extension():
    cpu_sources = ["csrc/divfast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DDIVFAST_EXT"]  # fused multiply-adds only where written (std::fma, intrinsics)
    include_dirs = [os.path.join(ROOT, "csrc")]
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None
    if with_cuda:
        # No --use_fast_math: it flushes denormals, and argmax must compare them like torch does.
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "-DDIVFAST_WITH_CUDA"]
        cxx.append("-DDIVFAST_WITH_CUDA")
        return (
            CUDAExtension(
                "divfast._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs + _nvidia_includes(),
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            ),
            True,
        )
    return (
        CppExtension(
            "divfast._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        ),
        False,
    )


def _write_build_info(with_cuda):
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CUDA_HOME = {CUDA_HOME if with_cuda else None!r}\n"
    )
    with open(os.path.join(ROOT, "divfast", "_build_info.py"), "w") as f:
        f.write(text)


EXTENSION, WITH_CUDA = _extension()
_write_build_info(WITH_CUDA)

setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
