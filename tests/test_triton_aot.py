"""Every Triton kernel of ctmq compiles for Hopper (sm_90) and Ampere (sm_80)
in the configurations ctmq launches, without spills, and the quantizer
kernels round exactly (no flush to zero). Runs tests/triton_aot.py in a
subprocess per target: it needs the real compiler, not the interpreter
the other tests run Triton under."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (90, 80)

triton = pytest.importorskip("triton")
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton without its bundled cuobjdump"),
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: the JSON report of tests/triton_aot.py}; both targets compile at once."""
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        arch: subprocess.Popen(
            [
                sys.executable,
                "tests/triton_aot.py",
                "--arch",
                str(arch),
                "--json",
                str(tmp / f"sm{arch}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arch in ARCHS
    }
    reports = {}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"sm_{arch} ahead-of-time compile failed:\n{out[-6000:]}"
        print(out)
        reports[arch] = json.loads((tmp / f"sm{arch}.json").read_text())
    return reports


@pytest.mark.parametrize("arch", ARCHS)
def test_every_triton_kernel_compiles(compiled, arch):
    report = compiled[arch]
    assert report["kernels"], "no @triton.jit kernel discovered"
    launched = {r["kernel"] for r in report["rows"]}
    missing = sorted(set(report["kernels"]) - launched)
    assert not missing, (
        f"sm_{arch}: kernels no configuration of tests/triton_aot.py launches "
        f"(add their launches there): {missing}"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_no_triton_kernel_spills(compiled, arch):
    spills = [
        (r["config"], r["REG"], r["LOCAL"], r["STACK"])
        for r in compiled[arch]["rows"]
        if r["LOCAL"] or r["STACK"]
    ]
    assert not spills, f"sm_{arch}: local memory (spills) in {len(spills)} launches: {spills[:5]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_quantizer_kernels_do_not_flush_denormals(compiled, arch):
    report = compiled[arch]
    ftz = {
        (r["kernel"], tuple(r["ftz"]))
        for r in report["rows"]
        if r["module"] in report["exact_modules"] and r["ftz"]
    }
    assert not ftz, f"sm_{arch}: flush-to-zero instructions in exact kernels: {sorted(ftz)}"
