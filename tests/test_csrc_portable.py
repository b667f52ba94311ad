"""The CPU extension's C++ is portable: every csrc/cpu/*.cpp compiles for
aarch64 (cross compiler) with setup.py's flags, and for x86-64 with the SIMD
paths left out (CTMQ_NO_SIMD); the binary conv's code paths, driven without
torch (tests/cpu_driver), match a naive popcount reference bit for bit natively
and, under qemu-user, on aarch64 (NEON and scalar).

Where the cross compiler or qemu is missing the aarch64 tests skip, unless
CTMQ_REQUIRE_AARCH64 is set (CI installs both and sets it)."""

import ast
import os
import pathlib
import platform
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

pytestmark = pytest.mark.slow  # compiles the C++ sources several ways

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("csrc/cpu/*.cpp"))
# the sources that include binary_kernels.h, the only ones CTMQ_NO_SIMD changes
SIMD_SOURCES = [s for s in CPU_SOURCES if '#include "binary_kernels.h"' in (ROOT / s).read_text()]
# the conv library of binary_conv.h: every csrc/cpu source that needs no torch
LIBRARY = [
    s for s in CPU_SOURCES if not any(h in (ROOT / s).read_text() for h in ("<ATen/", "<torch/"))
]
DRIVER = ["tests/cpu_driver/binary_conv_check.cpp", *LIBRARY]
GXX = shutil.which("g++")
AARCH64_GXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
REQUIRE_AARCH64 = os.environ.get("CTMQ_REQUIRE_AARCH64", "0") not in ("", "0")
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _setup_cxx_flags():
    """setup.py's CXX_FLAGS, read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "CXX_FLAGS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no CXX_FLAGS")


CXX_FLAGS = _setup_cxx_flags()
DRIVER_FLAGS = [f for f in CXX_FLAGS if f != "-fopenmp"]  # the conv's paths use no OpenMP
INCLUDES = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]


def _needs(tool, what):
    if tool is None:
        if REQUIRE_AARCH64:
            pytest.fail(f"{what} not found and CTMQ_REQUIRE_AARCH64 is set")
        pytest.skip(f"{what} not found")


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_flags_carry_no_x86_options():
    """What setup.py passes must mean the same to an aarch64 compiler."""
    assert not [f for f in CXX_FLAGS if f.startswith(("-m", "-march", "-mtune"))], CXX_FLAGS


@pytest.mark.parametrize("source", CPU_SOURCES)
def test_cpu_source_compiles_for_aarch64(source, tmp_path):
    _needs(AARCH64_GXX, "aarch64-linux-gnu-g++")
    obj = tmp_path / "out.o"
    _run([AARCH64_GXX, *CXX_FLAGS, *INCLUDES, "-c", source, "-o", obj])
    assert obj.stat().st_size > 0


@pytest.mark.skipif(GXX is None, reason="g++ not found")
@pytest.mark.parametrize("source", SIMD_SOURCES)
def test_cpu_source_compiles_without_simd(source, tmp_path):
    obj = tmp_path / "out.o"
    _run([GXX, *CXX_FLAGS, *INCLUDES, "-DCTMQ_NO_SIMD", "-c", source, "-o", obj])
    assert obj.stat().st_size > 0


def _driver_paths(stdout):
    assert stdout.strip().endswith("OK"), stdout
    return [line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("path ")]


@pytest.mark.skipif(GXX is None, reason="g++ not found")
@pytest.mark.parametrize("defines", [[], ["-DCTMQ_NO_SIMD"]], ids=["simd", "no_simd"])
def test_binary_conv_paths_match_reference_natively(defines, tmp_path):
    exe = tmp_path / "check"
    _run([GXX, *DRIVER_FLAGS, *defines, "-Icsrc/cpu", *DRIVER, "-o", exe])
    paths = _driver_paths(_run([exe], timeout=300))
    if defines:
        assert paths == ["scalar"]
    elif X86_64:  # as far as the CPU goes
        assert paths in (["scalar"], ["scalar", "avx2"], ["scalar", "avx2", "avx512-vpopcntdq"]), (
            paths
        )
    else:
        assert paths[0] == "scalar", paths


def test_binary_conv_paths_match_reference_on_aarch64(tmp_path):
    _needs(AARCH64_GXX, "aarch64-linux-gnu-g++")
    _needs(QEMU, "qemu-aarch64 (qemu-user)")
    exe = tmp_path / "check"
    _run([AARCH64_GXX, *DRIVER_FLAGS, "-static", "-Icsrc/cpu", *DRIVER, "-o", exe])
    assert _driver_paths(_run([QEMU, exe], timeout=600)) == ["scalar", "neon"]
