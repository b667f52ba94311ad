"""The native runtime (csrc/native, csrc/runtime; no torch): through its
Python binding, its command line built with CMake, under sanitizers and a
fuzz loop, and cross-built for aarch64 under qemu-user. Its logits are the
same bits on every CPU path and both ISAs; against the torch engine they
agree to float rounding (its float ops are its own kernels, not oneDNN's);
it refuses the same bad files with the same messages."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from bad_artifacts import make_cases
from model_helpers import randomized
from torch import nn

import ctmq
from ctmq import deploy
from ctmq.export import export_binary
from ctmq.models import MODELS
from ctmq.nn import QConv2d, RPReLU, set_bits

ROOT = pathlib.Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
AARCH64_GXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
REQUIRE_AARCH64 = os.environ.get("CTMQ_REQUIRE_AARCH64", "0") not in ("", "0")
X86 = os.uname().machine in ("x86_64", "amd64")
PATHS = ["auto", "avx2", "scalar"] if X86 else ["auto", "scalar"]


def _native_built():
    import importlib.util

    return importlib.util.find_spec("ctmq._native") is not None


pytestmark = pytest.mark.skipif(
    not (_native_built() and ctmq.has_extension()), reason="ctmq._native / ctmq._C not built"
)


ZOO = [
    ("resnet18", dict(stem="imagenet", width=0.25), 64, 3),
    ("resnet34", dict(stem="cifar", block="basic", width=0.125), 16, 3),
    ("vgg_small", dict(width=0.125), 32, 3),
    ("reactnet_a", dict(stem="cifar", width=0.25, in_channels=1), 16, 1),
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = []
    for i, (name, kwargs, size, ch) in enumerate(ZOO):
        torch.manual_seed(i)
        model = randomized(set_bits(MODELS[name](10, **kwargs), 1, 1))
        path = tmp_path_factory.mktemp("zoo") / f"{name}.ctmq"
        export_binary(model, path, input_size=size)
        x = np.random.default_rng(i).standard_normal((3, ch, size, size)).astype(np.float32)
        out.append((path, x))
    return out


@pytest.mark.parametrize("case", range(len(ZOO)), ids=[z[0] for z in ZOO])
def test_native_agrees_with_the_torch_engine(zoo, case):
    path, x = zoo[case]
    native = deploy.load(path, engine="native", threads=2)
    got = native(x)
    want = deploy.load(path, engine="executor")(torch.from_numpy(x)).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-3 * scale
    assert (got.argmax(1) == want.argmax(1)).all()
    idx, prob = native.predict(x, topk=3)
    assert idx.shape == (3, 3) and np.all(np.diff(prob, axis=1) <= 0)


class FloatOps(nn.Module):
    """Every elementwise op and pooling of the vocabulary on a float map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.prelu = nn.PReLU(5)
        self.rprelu = RPReLU(5)
        self.relu6 = nn.ReLU6()
        self.q = QConv2d(30, 30, 1, bias=False, w_bits=1, a_bits=1)  # (export wants one)
        self.bnq = nn.BatchNorm2d(30)
        self.fc = nn.Linear(30, 4)

    def forward(self, x):
        x = self.stem(x)
        F = nn.functional
        x = torch.cat(
            [
                F.relu(x),
                F.hardtanh(x, -0.5, 0.75),
                F.leaky_relu(x, 0.2),
                self.prelu(x),
                self.rprelu(x),
                self.relu6(x),
            ],
            1,
        )
        x = x + self.bnq(self.q(x))
        x = F.avg_pool2d(F.max_pool2d(x, 3, 2, 1), 2, ceil_mode=True)  # 11 -> 6 -> 3
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_native_float_ops_follow_torch(tmp_path):
    torch.manual_seed(0)
    model = randomized(FloatOps())
    with torch.no_grad():
        model.prelu.weight.copy_(torch.linspace(-0.5, 0.9, 5))
        model.stem.weight.mul_(8)  # values past relu6's 6 and hardtanh's bounds
    export_binary(model, tmp_path / "ops.ctmq", input_size=11)
    x = torch.randn(3, 3, 11, 11)
    with torch.no_grad():
        want = model(x).numpy()
    for cpu_path in PATHS:
        got = deploy.load(tmp_path / "ops.ctmq", engine="native", cpu_path=cpu_path)(x.numpy())
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), cpu_path


@pytest.mark.parametrize("case", range(len(ZOO)), ids=[z[0] for z in ZOO])
def test_native_logits_are_the_same_bits_on_every_path_and_thread_count(zoo, case):
    path, x = zoo[case]
    want = deploy.load(path, engine="native", threads=1, cpu_path="scalar")(x)
    for cpu_path in PATHS:
        for threads in (1, 2, 3):
            rt = deploy.load(path, engine="native", threads=threads, cpu_path=cpu_path)
            assert np.array_equal(rt(x), want), (cpu_path, threads)


def test_native_refuses_what_the_torch_loader_refuses_with_the_same_words(tmp_path):
    import re

    for name, words in make_cases(tmp_path).items():
        with pytest.raises(deploy.ArtifactError) as torch_err:
            deploy.load(tmp_path / name)
        with pytest.raises(deploy.ArtifactError) as native_err:
            deploy.load(tmp_path / name, engine="native")
        assert re.search(words, str(native_err.value)), (name, str(native_err.value))
        assert re.search(words, str(torch_err.value)), (name, str(torch_err.value))


def test_native_binding_runs_without_torch(zoo, tmp_path):
    path, x = zoo[0]
    np.save(tmp_path / "x.npy", x)
    want = deploy.load(path, engine="native")(x)
    np.save(tmp_path / "want.npy", want)
    code = f"""
import sys
sys.modules["torch"] = None  # import torch fails from here on
import numpy as np
from ctmq import deploy
rt = deploy.load({str(path)!r}, engine="native")
got = rt(np.load({str(tmp_path / "x.npy")!r}))
assert np.array_equal(got, np.load({str(tmp_path / "want.npy")!r}))
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print("ok", rt.cpu_path)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]


def test_ctmq_infer_and_bench_with_the_native_engine(zoo, tmp_path, capsys):
    from PIL import Image

    from ctmq.cli import main

    path, x = zoo[0]
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    np.save(tmp_path / "x.npy", x)
    out = {}
    for engine in ("executor", "native"):
        assert (
            main(
                [
                    "infer",
                    str(path),
                    str(tmp_path / "a.png"),
                    str(tmp_path / "x.npy"),
                    "--topk",
                    "1",
                    "--engine",
                    engine,
                    "--json",
                    str(tmp_path / f"{engine}.json"),
                ]
            )
            == 0
        )
        out[engine] = json.loads((tmp_path / f"{engine}.json").read_text())
        capsys.readouterr()
    # the same inputs and classes; probabilities to float rounding
    assert [(r["input"], r["top"][0][0]) for r in out["native"]] == [
        (r["input"], r["top"][0][0]) for r in out["executor"]
    ]
    assert main(["bench", "deploy", str(path), "--engine", "native", "--batch", "1"]) in (0, None)
    assert "engine native" in capsys.readouterr().out


def test_ctmq_infer_without_the_native_library_is_one_line(zoo, tmp_path, capsys, monkeypatch):
    from ctmq.cli import main
    from ctmq.deploy import native

    path, x = zoo[0]
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(native, "_lib", None)
    # as where ctmq/_native was not built
    no_spec = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None))
    monkeypatch.setattr(native, "importlib", no_spec)
    monkeypatch.delenv(native.LIBRARY_ENV, raising=False)
    code = main(["infer", str(path), str(tmp_path / "x.npy"), "--engine", "native"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "error: --engine native: ctmq's native runtime is not built" in err, err


def test_native_refuses_bad_images_in_one_line(zoo):
    path, x = zoo[0]
    rt = deploy.load(path, engine="native")
    c, s = rt.input_channels, rt.input_size
    with pytest.raises(TypeError, match="images must be a float NumPy array"):
        rt(torch.from_numpy(x))
    with pytest.raises(TypeError, match="images must be a float NumPy array"):
        rt(np.zeros((1, c, s, s), np.int32))
    with pytest.raises(ValueError, match=rf"images must have shape \(N, {c}, {s}, {s}\)"):
        rt(np.zeros((1, c + 1, s, s), np.float32))
    bad = x.copy()
    bad.flat[5] = np.nan
    with pytest.raises(ValueError, match="images contain NaN or infinite values"):
        rt(bad)


def test_native_binding_errors():
    with pytest.raises(deploy.ArtifactError, match="cannot read"):
        deploy.load("/nonexistent.ctmq", engine="native")
    with pytest.raises(ValueError, match="engine 'native' runs on the CPU"):
        deploy.load("/nonexistent.ctmq", device="cuda", engine="native")
    with pytest.raises(TypeError, match="apply to engine 'native' only"):
        deploy.load("/nonexistent.ctmq", threads=2)


# ------------------------------------------------------------------ CMake
def _cmake_build(build, *options):
    _run([CMAKE, "-S", ROOT / "csrc", "-B", build, "-DCMAKE_BUILD_TYPE=Release", *options])
    _run([CMAKE, "--build", build, "-j", "2"])
    return build


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    if CMAKE is None:
        pytest.skip("cmake not found")
    return _cmake_build(tmp_path_factory.mktemp("native"))


@pytest.mark.slow
def test_command_line_classifies_as_ctmq_infer_does(cmake_build, zoo, tmp_path):
    from PIL import Image

    path, x = zoo[0]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp_path / "gray.png")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    run = subprocess.run(
        [
            cmake_build / "ctmq-run",
            path,
            tmp_path / "rgb.png",
            tmp_path / "gray.png",
            tmp_path / "x.npy",
            tmp_path / "bad.png",
            "--topk",
            "2",
            "--logits",
            tmp_path / "logits.npy",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "bad.png: not a readable image" in run.stderr, run.stderr
    assert "1 of 6 inputs failed" in run.stderr
    # the images' pixels as ctmq infer makes them (Pillow), through the binding: the same logits
    from ctmq.cli.deploy import _load_image

    rt = deploy.load(path, engine="native")
    torch_rt = deploy.load(path)
    pixels = np.concatenate(
        [_load_image(str(tmp_path / n), torch_rt).numpy() for n in ("rgb.png", "gray.png")]
    )
    want = np.concatenate([rt(pixels), rt(x)])
    assert np.array_equal(np.load(tmp_path / "logits.npy"), want)
    lines = run.stdout.splitlines()
    assert len(lines) == 5 and lines[0].startswith(f"{tmp_path / 'rgb.png'}: ")
    assert lines[2].startswith(f"{tmp_path / 'x.npy'}[0]: ") and lines[0].count("%") == 2


@pytest.mark.slow
def test_command_line_errors_are_one_line(cmake_build, zoo, tmp_path):
    exe = cmake_build / "ctmq-run"
    for args, words, status in (
        ([], "required: MODEL.ctmq", 2),
        ([zoo[0][0], "x.npy", "--topk", "0"], "--topk: expected a positive", 2),
        ([tmp_path / "none.ctmq", "x.npy"], "none.ctmq: cannot read", 2),
        ([zoo[0][0], tmp_path / "none.npy"], "no input could be classified", 2),
    ):
        res = subprocess.run([str(a) for a in (exe, *args)], capture_output=True, text=True)
        assert res.returncode == status and words in res.stderr, res.stderr
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.startswith(
        "ctmq-run "
    )


@pytest.mark.slow
def test_installed_library_and_the_c_example(cmake_build, zoo, tmp_path):
    """cmake --install, then csrc/native/examples/classify.c (the README's C
    example) built with the installed pkg-config file: it classifies as the
    Python binding does."""
    cc, pkg_config = shutil.which("cc"), shutil.which("pkg-config")
    if cc is None or pkg_config is None:
        pytest.skip("cc or pkg-config not found")
    prefix = tmp_path / "prefix"
    _run([CMAKE, "--install", cmake_build, "--prefix", prefix])
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    flags = _run([pkg_config, "--cflags", "--libs", "ctmq_runtime"], env=env).stdout.split()
    exe = tmp_path / "classify"
    _run(
        [
            cc,
            ROOT / "csrc" / "native" / "examples" / "classify.c",
            "-o",
            exe,
            *flags,
            f"-Wl,-rpath,{prefix / 'lib'}",
        ]
    )
    path, _ = zoo[0]
    lines = _run([exe, path]).stdout.splitlines()
    rt = deploy.load(path, engine="native")
    gray = np.full((1, 3, rt.input_size, rt.input_size), 128 / 255, np.float32)
    idx, prob = rt.predict(rt.preprocess(gray), topk=5)
    assert [line.split()[0] for line in lines] == [rt.class_names[i] for i in idx[0]]
    assert float(lines[0].split()[1].rstrip("%")) == pytest.approx(100 * prob[0, 0], abs=0.051)


@pytest.mark.slow
def test_api_edges_top_k_allocation_failure_and_a_throwing_pool_range(cmake_build, zoo, tmp_path):
    """tests/native_api_check.cpp against the static library: ctmq_topk's
    order and ties, ctmq_run_pixels past memory returning an error (nothing
    thrown across the C API), and the pool rethrowing a range's exception
    after every range has finished."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "native_api_check"
    _run(
        [
            cxx,
            "-std=c++17",
            "-O1",
            ROOT / "tests" / "native_api_check.cpp",
            f"-I{ROOT / 'csrc' / 'native'}",
            cmake_build / "libctmq_runtime.a",
            "-pthread",
            "-o",
            exe,
        ]
    )
    res = subprocess.run([str(exe), str(zoo[0][0])], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@pytest.mark.slow
def test_sanitizers_and_the_loader_fuzz_loop(zoo, tmp_path):
    """The runtime under AddressSanitizer and UndefinedBehaviorSanitizer: the
    zoo's models run, and a bounded loop of mutated artifacts (and of mutated
    headers checked past their checksum) ends with no crash and no report."""
    if CMAKE is None:
        pytest.skip("cmake not found")
    build = _cmake_build(tmp_path / "asan", "-DCTMQ_SANITIZE=address,undefined", "-DCTMQ_FUZZ=ON")
    env = dict(
        os.environ,
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    for path, x in zoo:
        np.save(tmp_path / "x.npy", x)
        _run([build / "ctmq-run", path, tmp_path / "x.npy", "--threads", "2"], env=env)
    seeds = [str(p) for p, _ in zoo]
    res = _run([build / "ctmq-fuzz-loader", *seeds, "--runs", "3000"], env=env)
    assert "no crash" in res.stdout
    res = _run([build / "ctmq-fuzz-loader", *seeds, "--runs", "400", "--headers"], env=env)
    assert "no crash" in res.stdout


@pytest.mark.slow
def test_thread_sanitizer_on_the_thread_pool(zoo, tmp_path):
    """ctmq-run under ThreadSanitizer with more threads than cores: the spin-
    then-sleep pool hands out regions and collects them with no data race,
    and the logits are the single-threaded ones."""
    if CMAKE is None:
        pytest.skip("cmake not found")
    build = tmp_path / "tsan"
    _run(
        [
            CMAKE,
            "-S",
            ROOT / "csrc",
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCTMQ_SANITIZE=thread",
        ]
    )
    _run([CMAKE, "--build", build, "-j", "2", "--target", "ctmq-run"])
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1")
    for path, x in zoo:
        np.save(tmp_path / "x.npy", x)
        got = {}
        for threads in (1, 3):
            out = tmp_path / f"logits{threads}.npy"
            _run(
                [
                    build / "ctmq-run",
                    path,
                    tmp_path / "x.npy",
                    "--threads",
                    threads,
                    "--logits",
                    out,
                ],
                env=env,
            )
            got[threads] = np.load(out)
        assert np.array_equal(got[1], got[3]), path.name


def _needs(tool, what):
    if tool is None:
        if REQUIRE_AARCH64:
            pytest.fail(f"{what} not found and CTMQ_REQUIRE_AARCH64 is set")
        pytest.skip(f"{what} not found")


@pytest.mark.slow
def test_aarch64_build_gives_the_same_logits_under_qemu(zoo, tmp_path):
    """ctmq-run cross-built for aarch64 (NEON and scalar paths) writes the same
    logits as the x86-64 build, bit for bit."""
    _needs(AARCH64_GXX, "aarch64-linux-gnu-g++")
    _needs(QEMU, "qemu-aarch64")
    if CMAKE is None:
        pytest.skip("cmake not found")
    toolchain = tmp_path / "aarch64.cmake"
    toolchain.write_text(
        "set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR aarch64)\n"
        f"set(CMAKE_CXX_COMPILER {AARCH64_GXX})\n"
    )
    build = _cmake_build(
        tmp_path / "arm", f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DCMAKE_EXE_LINKER_FLAGS=-static"
    )
    for i, (path, x) in enumerate(zoo):
        np.save(tmp_path / "x.npy", x)
        want = deploy.load(path, engine="native")(x)
        for cpu_path in ("neon", "scalar"):
            out = tmp_path / f"arm-{i}-{cpu_path}.npy"
            _run(
                [
                    QEMU,
                    build / "ctmq-run",
                    path,
                    tmp_path / "x.npy",
                    "--cpu-path",
                    cpu_path,
                    "--logits",
                    out,
                ]
            )
            assert np.array_equal(np.load(out), want), (path.name, cpu_path)
