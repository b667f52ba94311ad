"""Builds ctmq._C from csrc/ with torch's BuildExtension (ninja).

C++ sources (csrc/**/*.cpp) always; CUDA sources (csrc/**/*.cu) only where a
CUDA toolkit and a CUDA build of torch are present and CTMQ_SKIP_CUDA_BUILD is
not set. Metadata and dependencies live in pyproject.toml.

C++20: torch 2.14 and newer need it in their headers, and the older ones
compile under it too. The CUDA toolkit is nvcc's own folder, asked of nvcc
(`nvcc --dryrun` prints it): torch guesses it from where `nvcc` is found,
which is wrong when that is a wrapper script (e.g. /usr/local/bin/nvcc). A
toolkit without its headers is skipped with one line, and the C++ kernels
are built alone.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# No -m flags: the x86 SIMD paths carry their own target attributes and are
# chosen at run time (csrc/cpu/binary_gemm.h), so these build the same sources
# on x86-64 and aarch64 (tests/test_csrc_portable.py cross-compiles with them).
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++20",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "--fmad=false",
]


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _nvcc_toolkit():
    """The CUDA toolkit folder of the nvcc on PATH (CUDA_HOME if set), or None."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line.split("=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _usable_toolkit(home):
    return home is not None and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _extensions():
    import torch

    wants_cuda = torch.version.cuda is not None and not _flag("CTMQ_SKIP_CUDA_BUILD")
    if wants_cuda:
        home = _nvcc_toolkit()
        if _usable_toolkit(home):
            os.environ["CUDA_HOME"] = home  # before cpp_extension reads it
        else:
            print(
                f"ctmq: no CUDA toolkit with headers found (nvcc: {shutil.which('nvcc')}, "
                f"toolkit: {home}): building the C++ kernels only; set CUDA_HOME to build "
                "the CUDA kernels",
                file=sys.stderr,
            )
            wants_cuda = False
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # csrc/cuda holds the CUDA kernels (.cu) and their torch bindings (.cpp);
    # csrc/native the torch-free runtime's C API, command line and fuzz target
    cpp = sorted(
        set(glob.glob("csrc/**/*.cpp", recursive=True))
        - set(glob.glob("csrc/cuda/*.cpp"))
        - set(glob.glob("csrc/native/**/*.cpp", recursive=True))
    )
    cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = bool(cu) and wants_cuda and CUDA_HOME is not None
    native = _native_extension()
    if not with_cuda:
        return [
            CppExtension(
                "ctmq._C", cpp, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]
            ),
            native,
        ]
    return [
        CUDAExtension(
            "ctmq._C",
            cpp + cu,
            define_macros=[("CTMQ_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        ),
        native,
    ]


def _native_extension():
    """ctmq._native: the native runtime (csrc/runtime, the CPU binary kernels,
    csrc/native's C API) as a library without torch, which
    ctmq.deploy.load(..., engine="native") loads through ctypes."""
    from setuptools import Extension

    torch_free = [
        f
        for f in sorted(glob.glob("csrc/cpu/*.cpp"))
        if not re.search(r"#include\s*<(ATen|torch|c10)/", open(f).read())
    ]
    sources = (
        torch_free
        + sorted(glob.glob("csrc/runtime/*.cpp"))
        + [
            "csrc/native/runtime.cpp",
            "csrc/native/thread_pool.cpp",
            "csrc/native/python_module.cpp",
        ]
    )
    flags = [f for f in CXX_FLAGS if f != "-fopenmp"]
    return Extension(
        "ctmq._native",
        sources,
        language="c++",
        extra_compile_args={"cxx": flags},
        extra_link_args=["-pthread"],
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
