"""Every csrc/**/*.cu compiles with nvcc for sm_80 and sm_90 (where nvcc exists)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("csrc/**/*.cu"))
NVCC = shutil.which("nvcc")
ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CU_FILES or [pytest.param(None, marks=pytest.mark.skip(
    reason="no .cu sources yet"))])
def test_cu_compiles_for_sm80_and_sm90(source, tmp_path):
    obj = tmp_path / "out.o"
    cmd = [NVCC, "-std=c++17", "-O3", "-Icsrc", *ARCHS, "-c", source, "-o", str(obj)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert obj.stat().st_size > 0


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_binary_conv_sass_uses_and_popc_bmma(tmp_path):
    """The binary tensor-core conv must use the native AND form on sm_80 and
    sm_90 (Hopper emulates the XOR form, about 6x slower)."""
    obj = tmp_path / "binary_conv.o"
    cmd = [NVCC, "-std=c++17", "-O3", "-Icsrc", *ARCHS, "-c", "csrc/cuda/binary_conv.cu", "-o", str(obj)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for arch in ("sm_80", "sm_90"):
        sass = subprocess.run([_cuobjdump(), "--dump-sass", "-arch", arch, str(obj)],
                              capture_output=True, text=True, check=True).stdout
        bmma = [line for line in sass.splitlines() if "BMMA" in line]
        assert bmma, f"{arch}: no BMMA instruction"
        assert all("AND.POPC" in line for line in bmma), f"{arch}: {bmma[:3]}"
