"""Builds ctmq._C from csrc/ with torch's BuildExtension (ninja).

C++ sources (csrc/**/*.cpp) always; CUDA sources (csrc/**/*.cu) only where a
CUDA toolkit and a CUDA build of torch are present and CTMQ_SKIP_CUDA_BUILD is
not set. Metadata and dependencies live in pyproject.toml.
"""
import glob
import os

from setuptools import setup


# No -m flags: the x86 SIMD paths carry their own target attributes and are
# chosen at run time (csrc/cpu/binary_gemm.h), so these build the same sources
# on x86-64 and aarch64 (tests/test_csrc_portable.py cross-compiles with them).
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # csrc/cuda holds the CUDA kernels (.cu) and their torch bindings (.cpp)
    cpp = sorted(set(glob.glob("csrc/**/*.cpp", recursive=True)) - set(glob.glob("csrc/cuda/*.cpp")))
    cu = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None \
        and not _flag("CTMQ_SKIP_CUDA_BUILD")
    if not with_cuda:
        return [CppExtension("ctmq._C", cpp, extra_compile_args={"cxx": CXX_FLAGS},
                         extra_link_args=["-fopenmp"])]
    nvcc = ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90", "--fmad=false"]
    return [CUDAExtension("ctmq._C", cpp + cu, define_macros=[("CTMQ_WITH_CUDA", None)],
                          extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc},
                          extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
