"""ctmq.binary on the CPU: packing and XNOR-popcount conv against the float
reference F.conv2d(sign(x), sign(w)), exactly, on every CPU code path the
machine has (auto-detected, avx2 or neon, scalar)."""

import itertools
import platform

import pytest
import torch
import torch.nn.functional as F

import ctmq
from ctmq import binary, ops

pytestmark = pytest.mark.skipif(not ctmq.has_extension(), reason="ctmq._C not built")


def sign(t):
    return torch.where(t >= 0, 1.0, -1.0)


# What set_cpu_path accepts in this architecture's build (csrc/cpu/binary_gemm.h):
# "auto", the SIMD path's cap where there is one, "scalar".
_SIMD_REQUEST = {"x86_64": "avx2", "amd64": "avx2", "aarch64": "neon", "arm64": "neon"}.get(
    platform.machine().lower()
)
_REQUESTS = ["auto", *([_SIMD_REQUEST] if _SIMD_REQUEST else []), "scalar"]


@pytest.fixture(params=_REQUESTS)
def cpu_path(request):
    ops.binary_cpu_path(request.param)
    yield ops.binary_cpu_path("")
    ops.binary_cpu_path("auto")


def _grid():
    for c, hw, k, s, p, b in itertools.product(
        [1, 3, 31, 32, 33, 64, 65, 130], [(7, 7), (8, 5)], [1, 3], [1, 2], [0, 1], [1, 3]
    ):
        if k == 1 and p == 1 and c not in (1, 33):
            continue  # keep the grid small; the border logic is the same
        yield c, hw, k, s, p, b


@pytest.mark.parametrize("c,hw,k,stride,pad,batch", list(_grid()))
def test_binary_conv_matches_float_reference(cpu_path, c, hw, k, stride, pad, batch):
    o = 5 if c < 64 else 37
    x = torch.randn(batch, c, *hw)
    w = torch.randn(o, c, k, k)
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=pad)
    y = binary.binary_conv2d(x, binary.pack_weight(w), stride=stride, padding=pad)
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    # scale/bias epilogue, and the packed output = sign of that float result
    scale = torch.randn(o)
    bias = torch.randn(o) * 3
    ref_sb = ref * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    y_sb = binary.binary_conv2d(x, w, stride=stride, padding=pad, scale=scale, bias=bias)
    assert torch.equal(y_sb, ref_sb)
    packed = binary.binary_conv2d(
        binary.pack_activation(x),
        w,
        stride=stride,
        padding=pad,
        scale=scale,
        bias=bias,
        out="packed",
    )
    assert isinstance(packed, binary.PackedActivation) and packed.channels == o
    assert torch.equal(binary.unpack_bits(packed.bits, o), sign(ref_sb))


def _available_cpu_paths():
    """{path in effect: the request that selects it} on this CPU and build."""
    if not ctmq.has_extension():
        return {"auto": "auto"}
    paths = {}
    try:
        for request in ("scalar", "avx2", "neon", "auto"):
            try:
                paths[ops.binary_cpu_path(request)] = request
            except RuntimeError:  # a path of another architecture
                pass
    finally:
        ops.binary_cpu_path("auto")
    return paths


_PATHS = _available_cpu_paths()


@pytest.fixture(params=list(_PATHS))
def each_cpu_path(request):
    try:
        assert ops.binary_cpu_path(_PATHS[request.param]) == request.param
        yield request.param
    finally:
        ops.binary_cpu_path("auto")


# K = KH * KW * ceil(C / 64) 64-bit words per output: the SIMD paths count in
# bytes and flush them into wider lanes every 31 words, so K > 31 and K > 64
# cover one flush and several; x = +1 against w = -1 makes every bit a mismatch
# (8 per byte per word), the most a byte counter ever holds.
@pytest.mark.parametrize(
    "c,k,hw,stride,pad",
    [
        (512, 3, (5, 7), 1, 1),  # K = 9 * 8 = 72
        (512, 3, (7, 6), 2, 1),  # K = 72, stride 2
        (2080, 1, (3, 5), 1, 0),  # K = 33
        (2080, 1, (5, 5), 2, 1),  # K = 33, stride 2, zero-padded border pixels
        (4160, 1, (3, 3), 1, 0),  # K = 65
        (1000, 3, (3, 5), 1, 1),  # K = 9 * 16 = 144, C not a multiple of 32
    ],
)
def test_binary_conv_long_k_on_every_cpu_path(each_cpu_path, c, k, hw, stride, pad):
    """Reductions of more than 31 and 64 words per output are exact on every CPU path."""
    o = 13
    x = torch.randn(2, c, *hw)
    w = torch.randn(o, c, k, k)
    w[:4] = -1.0  # channels 0-3 (one AVX2 vector) mismatch wherever x is +1
    x[1] = 1.0
    ref = F.conv2d(sign(x), sign(w), stride=stride, padding=pad)
    y = binary.binary_conv2d(x, binary.pack_weight(w), stride=stride, padding=pad)
    assert torch.equal(y, ref)
    assert ref[1, :4].min().item() == -c * k * k  # every bit of a full window mismatched
    packed = binary.binary_conv2d(
        x, w, stride=stride, padding=pad, bias=torch.full((o,), 0.5), out="packed"
    )
    assert torch.equal(binary.unpack_bits(packed.bits, o), sign(ref + 0.5))


@pytest.mark.parametrize("o", [8, 13, 64])
def test_residual_is_added_last_in_the_epilogue(cpu_path, o):
    x = torch.randn(2, 40, 9, 9)
    w = torch.randn(o, 40, 3, 3)
    scale, bias = torch.randn(o), torch.randn(o)
    res = torch.randn(2, o, 9, 9) * 5
    ref = (
        F.conv2d(sign(x), sign(w), padding=1) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    ) + res
    y = binary.binary_conv2d(x, w, padding=1, scale=scale, bias=bias, residual=res)
    assert torch.equal(y, ref)
    packed = binary.binary_conv2d(
        x, w, padding=1, scale=scale, bias=bias, residual=res, out="packed"
    )
    assert torch.equal(binary.unpack_bits(packed.bits, o), sign(ref))
    with pytest.raises(ValueError, match="residual must be a float32 tensor of shape"):
        binary.binary_conv2d(x, w, padding=1, residual=res[:, :, 1:])


def test_border_pixels_and_dilation(cpu_path):
    x = torch.randn(2, 40, 6, 6)
    w = torch.randn(9, 40, 3, 3)
    for dil, pad in [(1, 1), (2, 2), (2, 1), (2, 0)]:
        ref = F.conv2d(sign(x), sign(w), padding=pad, dilation=dil)
        y = binary.binary_conv2d(x, w, padding=pad, dilation=dil)
        assert torch.equal(y, ref)
        # corners and edges specifically (zero padding contributes nothing)
        assert torch.equal(y[..., 0, 0], ref[..., 0, 0]) and torch.equal(
            y[..., -1, :], ref[..., -1, :]
        )


def test_chain_of_binary_layers_stays_packed(cpu_path):
    x = torch.randn(1, 64, 9, 9)
    w1, w2 = torch.randn(64, 64, 3, 3), torch.randn(32, 64, 3, 3)
    s1, b1 = torch.rand(64) + 0.1, torch.randn(64)
    h = binary.binary_conv2d(x, w1, padding=1, scale=s1, bias=b1, out="packed")
    y = binary.binary_conv2d(h, w2, padding=1)
    h_ref = sign(
        F.conv2d(sign(x), sign(w1), padding=1) * s1.view(1, -1, 1, 1) + b1.view(1, -1, 1, 1)
    )
    assert torch.equal(y, F.conv2d(h_ref, sign(w2), padding=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pack_unpack_roundtrip_and_layouts(cpu_path, dtype):
    x = torch.randn(2, 70, 5, 3).to(dtype)
    x[0, 0, 0, 0] = 0.0
    x[0, 1, 0, 0] = -0.0
    bits = binary.pack_bits(x)
    assert bits.shape == (2, 5, 3, 3) and bits.dtype == torch.int32
    assert torch.equal(binary.unpack_bits(bits, 70), sign(x.float()))
    assert torch.equal(binary.pack_bits(x.contiguous(memory_format=torch.channels_last)), bits)
    big = torch.randn(2, 70, 5, 6).to(dtype)
    big[..., ::2] = x
    assert torch.equal(binary.pack_bits(big[..., ::2]), bits)  # non-contiguous input
    # bit j of word w is channel 32 w + j
    c = 37
    assert ((bits[0, 2, 1, c // 32] >> (c % 32)) & 1).item() == int(x[0, c, 2, 1] >= 0)


def test_pack_bits_other_dims():
    x = torch.randn(4, 3, 45)
    for dim in (0, 1, 2, -1):
        bits = binary.pack_bits(x, dim=dim)
        assert torch.equal(binary.unpack_bits(bits, x.shape[dim], dim=dim), sign(x))


def test_non_contiguous_and_channels_last_conv_input(cpu_path):
    x = torch.randn(2, 33, 7, 7)
    w = torch.randn(6, 33, 3, 3)
    ref = F.conv2d(sign(x), sign(w), padding=1)
    assert torch.equal(
        binary.binary_conv2d(x.contiguous(memory_format=torch.channels_last), w, padding=1), ref
    )
    assert torch.equal(
        binary.binary_conv2d(x.transpose(2, 3), w, padding=1),
        F.conv2d(sign(x.transpose(2, 3)), sign(w), padding=1),
    )


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda x, w: binary.binary_conv2d(x.long(), w), TypeError, "x must be a floating"),
        (lambda x, w: binary.binary_conv2d(binary.pack_bits(x), w), TypeError, "PackedActivation"),
        (lambda x, w: binary.binary_conv2d(x[0], w), ValueError, "x must be 4-D"),
        (lambda x, w: binary.binary_conv2d(x[:, :5], w), ValueError, "expects 8 input channels"),
        (
            lambda x, w: binary.binary_conv2d(x, binary.pack_weight(torch.randn(4, 40, 3, 3))),
            ValueError,
            "expects 40 input channels",
        ),
        (lambda x, w: binary.binary_conv2d(x, w, padding=-1), ValueError, "padding must be >= 0"),
        (lambda x, w: binary.binary_conv2d(x, w, stride=0), ValueError, "stride must be >= 1"),
        (lambda x, w: binary.binary_conv2d(x, w, stride=(1, 2, 3)), TypeError, "stride"),
        (lambda x, w: binary.binary_conv2d(x, w, dilation=9), ValueError, "does not fit"),
        (lambda x, w: binary.binary_conv2d(x, w, scale=torch.ones(3)), ValueError, "scale must be"),
        (lambda x, w: binary.binary_conv2d(x, w, out="int8"), ValueError, "out must be"),
        (lambda x, w: binary.pack_weight(w[0]), ValueError, "weight must be 4-D"),
        (
            lambda x, w: binary.unpack_bits(torch.zeros(2, 1, dtype=torch.int32), 33),
            ValueError,
            "channels",
        ),
        (lambda x, w: binary.binary_linear(x, w), ValueError, "x must be 2-D"),
        (lambda x, w: binary.binary_linear(x[:, :, 0, 0], w), ValueError, "weight must be 2-D"),
        (
            lambda x, w: binary.binary_linear(x[:, :, 0, 0], binary.pack_weight(w)),
            ValueError,
            "kernel 1x1",
        ),
        (
            lambda x, w: binary.binary_linear(binary.pack_activation(x), w[:, :, 0, 0]),
            ValueError,
            "1x1 images",
        ),
        (
            lambda x, w: binary.binary_linear(x[:, :5, 0, 0], w[:, :, 0, 0]),
            ValueError,
            "expects 8 input",
        ),
    ],
)
def test_bad_input_is_named(call, exc, words):
    with pytest.raises(exc, match=words):
        call(torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3))


@pytest.mark.parametrize("k", [1, 31, 33, 100, 257])
def test_binary_linear_is_the_sign_gemm(cpu_path, k):
    n, o = 5, 40
    x, w = torch.randn(n, k), torch.randn(o, k)
    scale, bias = torch.rand(o) + 0.5, torch.randn(o) * 3
    ref = sign(x) @ sign(w).T  # small integers: exact in float32
    assert torch.equal(binary.binary_linear(x, w), ref)
    wb = binary.pack_weight(w)
    y = binary.binary_linear(x, wb, scale=scale, bias=bias)
    assert y.shape == (n, o) and torch.equal(y, ref * scale + bias)
    packed = binary.binary_linear(x, wb, scale=scale, bias=bias, out="packed")
    assert packed.shape == (n, o, 1, 1)
    assert torch.equal(binary.unpack_bits(packed.bits, o)[:, :, 0, 0], sign(ref * scale + bias))
    w2 = torch.randn(7, o)  # a second layer takes the packed bits as they are
    assert torch.equal(binary.binary_linear(packed, w2), sign(ref * scale + bias) @ sign(w2).T)


def test_op_checks_name_the_argument():
    """ctmq::binary_conv2d checks its arguments once, for every device."""
    x = binary.pack_bits(torch.randn(1, 40, 5, 5))
    bits = binary.pack_weight(torch.randn(3, 40, 3, 3)).bits
    conv = torch.ops.ctmq.binary_conv2d
    args = [x, 40, bits, None, None, [1, 1], [0, 0], [1, 1], None, None, None, False]

    def call(**changes):
        names = [
            "x",
            "in_channels",
            "bits",
            "gemm",
            "tap_popc",
            "stride",
            "padding",
            "dilation",
            "scale",
            "bias",
            "residual",
            "packed_out",
        ]
        return conv(*[changes.get(n, a) for n, a in zip(names, args, strict=True)])

    assert call().shape == (1, 3, 3, 3)
    for changes, message in [
        ({"in_channels": 70}, "in_channels \\(70\\) does not fit x's 2 words"),
        ({"x": x.float()}, "x must be an int32 4-D tensor"),
        (
            {"bits": binary.pack_weight(torch.randn(3, 70, 3, 3)).bits},
            "weight bits are packed for 3",
        ),
        ({"stride": [0, 1]}, "stride must be 2 values in \\[1, 2\\^31\\)"),
        ({"stride": [1, 2**31]}, "stride must be 2 values in \\[1, 2\\^31\\)"),
        ({"padding": [-1, 0]}, "padding must be 2 values in \\[0, 2\\^31\\)"),
        ({"bits": torch.zeros(3, 0, 3, 2, dtype=torch.int32)}, "kernel of at least 1x1"),
        (
            {"bits": torch.zeros(3, 9, 9, 2, dtype=torch.int32), "padding": [4, 4]},
            "the CPU binary conv takes kernels of at most 64 taps, got 9x9",
        ),
        ({"dilation": [3, 3]}, "does not fit the padded input"),
        ({"scale": torch.ones(4)}, "scale must be a float32 tensor of shape \\(3,\\)"),
        ({"bias": torch.ones(3, dtype=torch.float64)}, "bias must be a float32"),
        (
            {"residual": torch.zeros(1, 3, 5, 5)},
            "residual must be a float32 tensor of shape \\(1, 3, 3, 3\\)",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            call(**changes)
    with pytest.raises(ValueError, match="x must be a float 4-D"):
        torch.ops.ctmq.pack_bits(torch.zeros(2, 3, dtype=torch.int32))
    big = torch.zeros(1, 1, 1, 2**19, dtype=torch.int32)  # 2^24 channels
    with pytest.raises(ValueError, match="must stay below 2\\^24"):
        conv(
            big,
            2**24,
            torch.zeros(1, 1, 1, 2**19, dtype=torch.int32),
            None,
            None,
            [1, 1],
            [0, 0],
            [1, 1],
            None,
            None,
            None,
            False,
        )


@pytest.mark.parametrize("packed_out", [False, True])
@pytest.mark.parametrize("triton", [False, True])
def test_binary_conv2d_op_equals_its_reference(packed_out, triton):
    """ctmq::binary_conv2d (C++, or Triton in the interpreter) equals
    ops.binary_conv2d_ref bit for bit: odd sizes, stride, padding, dilation,
    every epilogue."""
    g = torch.Generator().manual_seed(3)
    x = ops.pack_bits(torch.randn(2, 70, 7, 6, generator=g))
    bits = ops.pack_bits(torch.randn(5, 70, 3, 2, generator=g))
    scale, bias = torch.rand(5, generator=g), torch.randn(5, generator=g)
    residual = torch.randn(2, 5, 4, 4, generator=g)
    args = (x, 70, bits, [2, 1], [1, 0], [1, 2], scale, bias, residual, packed_out)
    with ctmq.force_triton(triton):
        y = ops.binary_conv2d(*args[:3], None, None, *args[3:])
    assert torch.equal(y, ops.binary_conv2d_ref(*args))


def test_kernel_level_checks():
    """The C++ kernel keeps its own checks: it may be called directly."""
    bits = binary.pack_bits(torch.randn(1, 40, 5, 5))
    pw = binary.pack_weight(torch.randn(3, 40, 3, 3))
    conv = torch.ops.ctmq.binary_conv2d_cpu
    with pytest.raises(RuntimeError, match="does not fit x's"):
        conv(
            bits,
            70,
            pw.gemm,
            pw.tap_popc,
            3,
            [3, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            None,
            None,
            None,
            False,
        )
    other = binary.pack_weight(torch.randn(3, 70, 3, 3))
    with pytest.raises(RuntimeError, match="weight is packed for"):
        conv(
            bits,
            40,
            other.gemm,
            other.tap_popc,
            3,
            [3, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            None,
            None,
            None,
            False,
        )
    with pytest.raises(RuntimeError, match="weight is packed for"):
        conv(
            bits,
            40,
            pw.gemm,
            pw.tap_popc,
            3,
            [1, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            None,
            None,
            None,
            False,
        )
    with pytest.raises(RuntimeError, match="x must be int32"):
        conv(
            bits.float(),
            40,
            pw.gemm,
            pw.tap_popc,
            3,
            [3, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            None,
            None,
            None,
            False,
        )
    with pytest.raises(RuntimeError, match="residual must be a contiguous float32"):
        conv(
            bits,
            40,
            pw.gemm,
            pw.tap_popc,
            3,
            [3, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            None,
            None,
            torch.zeros(1, 3, 5, 5),
            False,
        )


def test_opcheck_binary_ops():
    x = torch.randn(2, 33, 5, 5)
    torch.library.opcheck(torch.ops.ctmq.pack_bits.default, (x,))
    torch.library.opcheck(torch.ops.ctmq.pack_bits_cpu.default, (x,))
    bits = binary.pack_bits(x)
    pw = binary.pack_weight(torch.randn(4, 33, 3, 3))
    torch.library.opcheck(torch.ops.ctmq.binary_weight_gemm.default, (pw.bits,))
    for packed in (False, True):
        torch.library.opcheck(
            torch.ops.ctmq.binary_conv2d_cpu.default,
            (
                bits,
                33,
                pw.gemm,
                pw.tap_popc,
                4,
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1],
                torch.rand(4),
                None,
                torch.randn(2, 4, 3, 3),
                packed,
            ),
        )
        for gemm, tap_popc in ((None, None), (pw.gemm, pw.tap_popc)):
            torch.library.opcheck(
                torch.ops.ctmq.binary_conv2d.default,
                (
                    bits,
                    33,
                    pw.bits,
                    gemm,
                    tap_popc,
                    [2, 2],
                    [1, 1],
                    [1, 1],
                    torch.rand(4),
                    None,
                    torch.randn(2, 4, 3, 3),
                    packed,
                ),
            )


def test_backend_info_reports_a_path():
    info = binary.backend_info()
    assert info["cpu"] in ("avx512-vpopcntdq", "avx2", "neon", "scalar")
    assert ops.binary_cpu_path("scalar") == "scalar"
    assert binary.backend_info()["cpu"] == "scalar"
    ops.binary_cpu_path("auto")
    quoted = [f"'{r}'" for r in _REQUESTS]
    choices = ", ".join(quoted[:-1]) + " or " + quoted[-1]  # x86-64: 'auto', 'avx2' or 'scalar'
    foreign = ["avx512"] + [r for r in ("avx2", "neon") if r != _SIMD_REQUEST]
    for request in foreign:  # the best x86 path is detected only; another architecture's is refused
        with pytest.raises(RuntimeError, match=f"must be {choices}"):
            ops.binary_cpu_path(request)
    assert ops.binary_cpu_path("") == info["cpu"]  # a refused request changes nothing


def test_use_kernel_is_scoped_and_per_thread(monkeypatch):
    import threading

    from ctmq import backend

    monkeypatch.setattr(backend, "_ENV_BINARY_KERNEL", "triton")  # whatever CTMQ_BINARY_KERNEL says
    assert backend.cuda_binary_kernel() == "triton"
    seen = []
    with binary.use_kernel("bmma"):
        assert backend.cuda_binary_kernel() == "bmma"
        worker = threading.Thread(target=lambda: seen.append(backend.cuda_binary_kernel()))
        worker.start()
        worker.join()
        with binary.use_kernel("triton"):
            assert backend.cuda_binary_kernel() == "triton"
        assert backend.cuda_binary_kernel() == "bmma"
    assert backend.cuda_binary_kernel() == "triton" and seen == ["triton"]
    with pytest.raises(
        ValueError, match=r"kernel must be one of \('triton', 'bmma'\), got 'cudnn'"
    ):
        with binary.use_kernel("cudnn"):
            pass


def test_binary_kernel_env_is_the_default_and_checked():
    import subprocess
    import sys

    code = (
        "import ctmq, os; from ctmq import backend; os.environ['CTMQ_BINARY_KERNEL'] = 'triton';"
        "print(backend.cuda_binary_kernel())"
    )
    for value, expect in (("bmma", "bmma"), ("", "triton")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "CTMQ_BINARY_KERNEL": value},
        )
        assert out.stdout.strip() == expect, out.stderr  # read once, at import
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctmq; from ctmq import backend; backend.cuda_binary_kernel()",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "CTMQ_BINARY_KERNEL": "tensorcore"},
    )
    assert out.returncode != 0 and "CTMQ_BINARY_KERNEL must be one of" in out.stderr


def test_bmma_refused_clearly_where_it_cannot_run(monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(ops.selection, "bmma_built", lambda: False)
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        ops.check_bmma(dev)
    monkeypatch.setattr(ops.selection, "bmma_built", lambda: True)
    monkeypatch.setattr(ops.selection, "cuda_capability", lambda device: (7, 5))
    with pytest.raises(RuntimeError, match=r"compute capability 8.0 or newer .* cuda:0 is 7.5"):
        ops.check_bmma(dev)
    monkeypatch.setattr(ops.selection, "cuda_capability", lambda device: (8, 0))
    ops.check_bmma(dev)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_backend_info_without_cuda():
    info = binary.backend_info()
    assert info["cuda"].startswith("unavailable") and info["cuda_kernels"] == ()


def test_packed_weight_keeps_each_kernels_layout():
    """A CUDA graph captured with one kernel must keep reading live buffers after
    another kernel ran: each (device, kernel) layout is made once and kept."""
    pw = binary.pack_weight(torch.randn(9, 40, 3, 3))
    gemm, popc = pw.layout_for(pw.bits, "cpp")
    _, bmma_popc = pw.layout_for(pw.bits, "bmma")
    assert torch.equal(bmma_popc, ops.tap_popcounts(pw.bits))
    again = pw.layout_for(pw.bits, "cpp")
    assert again[0] is gemm and again[1] is popc
    assert pw.layout_for(pw.bits, "bmma")[1] is bmma_popc


def test_pack_bits_ref_is_the_packed_format():
    x = torch.randn(2, 70, 3, 5)
    x[0, :3, 0, 0] = torch.tensor([0.0, -0.0, -1e-30])
    x[1, 31, 1, 1] = 1.0  # bit 31: the word's sign bit
    assert torch.equal(ops.pack_bits_ref(x), ops.pack_bits(x))


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build registers the CUDA kernel")
def test_cuda_kernels_without_the_extension(monkeypatch):
    """The GPU benchmarks ask binary.cuda_kernels() which kernels to time: without
    ctmq._C (or without its CUDA kernels) that is Triton alone, not a crash on an
    op the dispatcher does not know."""
    from ctmq import backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops.selection, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(ops.selection, "_bmma_built", None)
    monkeypatch.setattr(backend, "has_extension", lambda: False)
    assert binary.cuda_kernels("cuda") == ("triton",)
    monkeypatch.setattr(ops.selection, "_bmma_built", None)
    monkeypatch.setattr(backend, "has_extension", lambda: True)
    assert binary.cuda_kernels("cuda") == ("triton",)  # a CPU build: no CUDA kernel registered
