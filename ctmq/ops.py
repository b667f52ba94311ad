"""torch.library ops of ctmq: one schema each, fake impls, device impls, autograd.

This module is the only place that chooses a backend:
  * CUDA tensors (float32/float16/bfloat16) run the fused Triton kernels;
  * CPU tensors, and float64 anywhere, run the torch reference path below,
    which defines the semantics the kernels are tested against bit for bit;
  * with ctmq.force_triton() or CTMQ_FORCE_TRITON=1, CPU tensors run the Triton
    kernels too, under TRITON_INTERPRET=1 (how CI tests the kernels).

The STE ops save a bit-packed mask (1 bit per element, memory order of the
tensor) for backward instead of a float tensor: it is what the gradient
needs, 1/16 of a bf16 activation, and it keeps the fused fwd+bwd within 3% of
the minimum bytes. approx_sign needs |x| itself, so it saves x.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _backend

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
STE_MODES = ("clipped", "approx_sign")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------- layout utils
def is_dense(t: Tensor) -> bool:
    """True if t covers exactly numel consecutive elements in some stride order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(t: Tensor) -> Tensor:
    return t if is_dense(t) else t.contiguous()


def _flat_memory(t: Tensor) -> Tensor:
    """1-D view of a dense tensor in memory order."""
    return t.as_strided((t.numel(),), (1,))


def restride(t: Tensor, shape, stride) -> Tensor:
    """t with exactly these strides (a copy only when they differ)."""
    if tuple(t.stride()) == tuple(stride):
        return t
    return torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).copy_(t)


_SHIFTS = {}


def _shifts(device):
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_mask(mask: Tensor) -> Tensor:
    """bool tensor (dense) -> uint8, bit j of byte i = memory element 8 i + j."""
    flat = _flat_memory(mask)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, like: Tensor) -> Tensor:
    """Inverse of pack_mask: a bool tensor with like's shape and strides."""
    bits = ((packed[:, None] >> _shifts(packed.device)) & 1).view(-1)[: like.numel()]
    out = torch.empty_like(like, dtype=torch.bool)
    _flat_memory(out).copy_(bits)
    return out


def _mask_bytes(x: Tensor) -> Tensor:
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _use_triton(t: Tensor) -> bool:
    if t.dtype not in _KERNEL_DTYPES or t.numel() == 0:
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and _backend.triton_forced())


def _kernels():
    return _backend.triton_kernels("quant")


def _use_cpp(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and _backend.has_extension()


def _cpp_fake(name):
    """register_fake for a C++ op, when the built extension defines it (an
    older build may not: `import ctmq` must not fail on that)."""
    def register(fn):
        if _backend.has_extension() and hasattr(torch.ops.ctmq, name):
            torch.library.register_fake(f"ctmq::{name}")(fn)
        return fn
    return register


@_cpp_fake("quantize_act_fused")
def _(x, bits):
    return torch.empty_like(x), _mask_bytes(x)


@_cpp_fake("masked_grad_fused")
def _(grad, mask):
    return torch.empty_like(grad)


def _check_bits(bits: int):
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS} (32 is handled as identity "
                         f"by ctmq.quant), got {bits}")


def _check_ste(ste: str, bits: int):
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
    if ste == "approx_sign" and bits != 1:
        raise ValueError(f"ste='approx_sign' applies to bits=1 only, got bits={bits}")


# ----------------------------------------------------------------- the family
def ctmq_levels(v: Tensor, bits: int) -> Tensor:
    """Q_k of DESIGN.md on a float32 tensor, in the op order the kernels use."""
    if bits == 1:  # sign with 0 -> +1; NaN stays NaN
        return torch.where(v >= 0, 1.0, torch.where(v < 0, -1.0, v))
    n = 2**bits - 1
    c = torch.where(v > 1, 1.0, torch.where(v < -1, -1.0, v))
    # 2 floor((c+1)/2 n + 1/2)/n - 1 == (2 floor(c n/2) + 1)/n for odd n; this
    # form keeps the sign of c exact near 0 (c + 1 would round it away).
    return (torch.floor(c * (n * 0.5)) * 2 + 1) / n


def _approx_sign_slope(v: Tensor) -> Tensor:
    return torch.clamp_min(2 - 2 * v.abs(), 0)


def _clipped_slope(v: Tensor) -> Tensor:
    return ((v >= -1) & (v <= 1)).to(v.dtype)


# ------------------------------------------------------------ fake_quant_affine
def _check_qparams_values(scale: Tensor, zero_point: Tensor, qmin: int, qmax: int):
    scale_ok = (torch.isfinite(scale) & (scale > 0)).all()
    zero_point_ok = ((zero_point >= qmin) & (zero_point <= qmax)).all()
    if scale.device.type != "cpu":
        # No host sync (a training step must not stall, and CUDA graphs must
        # capture it): a bad value fails as a device-side assert instead.
        torch._assert_async(scale_ok, "fake_quant_affine: scale must be finite and > 0")
        torch._assert_async(zero_point_ok, f"fake_quant_affine: zero_point must lie in "
                                           f"[qmin, qmax] = [{qmin}, {qmax}]")
        return
    if not bool(scale_ok):
        raise ValueError(f"scale must be finite and > 0, got {scale.tolist()}")
    if not bool(zero_point_ok):
        raise ValueError(f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], "
                         f"got {zero_point.tolist()}")


@torch.library.custom_op("ctmq::fake_quant_affine", mutates_args=(), device_types=("cpu", "cuda"))
def fake_quant_affine(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: Optional[int]) -> tuple[Tensor, Tensor]:
    """(out, packed STE mask); axis=None: scale/zero_point have one element."""
    _check_qparams_values(scale, zero_point, qmin, qmax)
    x = _dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), _mask_bytes(x)
    if _use_triton(x):
        scale = scale.to(torch.float32)
        per_channel = axis is not None
        return _kernels().fake_quant_affine(
            x, scale, 1.0 / scale, zero_point.to(torch.int32), qmin, qmax,
            x.stride(axis) if per_channel else 1, x.shape[axis] if per_channel else 1,
            per_channel)
    if axis is None:
        out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
            x, float(scale.item()), int(zero_point.item()), qmin, qmax)
    else:
        out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            x, scale.to(torch.float32), zero_point.to(torch.int32), axis, qmin, qmax)
    return out, pack_mask(restride(mask, out.shape, out.stride()))


@fake_quant_affine.register_fake
def _(x, scale, zero_point, qmin, qmax, axis):
    x = _dense(x)
    return torch.empty_like(x), _mask_bytes(x)


@torch.library.custom_op("ctmq::ste_masked_grad", mutates_args=(), device_types=("cpu", "cuda"))
def ste_masked_grad(grad: Tensor, mask: Tensor) -> Tensor:
    """grad * bit, bit i of mask for memory element i of grad (grad dense)."""
    if grad.numel() == 0:
        return torch.empty_like(grad)
    if _use_triton(grad):
        return _kernels().masked_grad(grad, mask)
    if _use_cpp(grad):
        return torch.ops.ctmq.masked_grad_fused(grad, mask)
    return masked_grad_ref(grad, mask)


def masked_grad_ref(grad: Tensor, mask: Tensor) -> Tensor:
    """Reference of ste_masked_grad in torch ops (any device)."""
    return grad * unpack_mask(mask, grad)


@ste_masked_grad.register_fake
def _(grad, mask):
    return torch.empty_like(grad)


def _masked_grad_backward(ctx, grad_grad):
    return ste_masked_grad(restride(grad_grad, ctx.shape, ctx.stride), ctx.saved_tensors[0]), None


def _masked_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.shape, ctx.stride = output.shape, output.stride()


torch.library.register_autograd("ctmq::ste_masked_grad", _masked_grad_backward,
                                setup_context=_masked_grad_setup)


def _affine_setup(ctx, inputs, output):
    out, mask = output
    ctx.save_for_backward(mask)
    ctx.shape, ctx.stride = out.shape, out.stride()


def _affine_backward(ctx, grad_out, _grad_mask):
    (mask,) = ctx.saved_tensors
    grad = ste_masked_grad(restride(grad_out, ctx.shape, ctx.stride), mask)
    return grad, None, None, None, None, None


torch.library.register_autograd("ctmq::fake_quant_affine", _affine_backward,
                                setup_context=_affine_setup)


# ------------------------------------------------------------------ activations
@torch.library.custom_op("ctmq::quantize_act", mutates_args=(), device_types=("cpu", "cuda"))
def quantize_act(x: Tensor, bits: int, ste: str) -> tuple[Tensor, Tensor]:
    """(Q_bits(x), packed mask of -1 <= x <= 1); ste only matters for backward."""
    _check_bits(bits)
    _check_ste(ste, bits)
    x = _dense(x)
    if x.numel() == 0:
        return torch.empty_like(x), _mask_bytes(x)
    if _use_triton(x):
        return _kernels().quantize_act(x, bits)
    if _use_cpp(x):
        return torch.ops.ctmq.quantize_act_fused(x, bits)
    return quantize_act_ref(x, bits)


def quantize_act_ref(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Reference of quantize_act in torch ops (any device, x dense)."""
    v = x.to(torch.float32) if x.dtype != torch.float64 else x
    return ctmq_levels(v, bits).to(x.dtype), pack_mask((v >= -1) & (v <= 1))


@quantize_act.register_fake
def _(x, bits, ste):
    _check_bits(bits)
    _check_ste(ste, bits)
    x = _dense(x)
    return torch.empty_like(x), _mask_bytes(x)


@torch.library.custom_op("ctmq::approx_sign_grad", mutates_args=(), device_types=("cpu", "cuda"))
def approx_sign_grad(grad: Tensor, x: Tensor) -> Tensor:
    """grad * max(0, 2 - 2|x|) (Bi-Real's ApproxSign); grad and x share strides."""
    if grad.numel() == 0:
        return torch.empty_like(grad)
    if _use_triton(grad):
        return _kernels().approx_sign_grad(grad, x)
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad.to(compute) * _approx_sign_slope(x.to(compute))).to(grad.dtype)


@approx_sign_grad.register_fake
def _(grad, x):
    return torch.empty_like(grad)


def _approx_sign_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.shape, ctx.stride = output.shape, output.stride()


def _approx_sign_grad_backward(ctx, grad_grad):
    (x,) = ctx.saved_tensors
    return approx_sign_grad(restride(grad_grad, ctx.shape, ctx.stride), x), None


torch.library.register_autograd("ctmq::approx_sign_grad", _approx_sign_grad_backward,
                                setup_context=_approx_sign_grad_setup)


def _act_setup(ctx, inputs, output):
    x, _bits, ste = inputs
    out, mask = output
    ctx.ste = ste
    ctx.shape, ctx.stride = out.shape, out.stride()
    # approx_sign needs |x|: save x in out's layout (a view unless x was strided).
    ctx.save_for_backward(restride(x, out.shape, out.stride()) if ste == "approx_sign" else mask)


def _act_backward(ctx, grad_out, _grad_mask):
    (saved,) = ctx.saved_tensors
    grad = restride(grad_out, ctx.shape, ctx.stride)
    if ctx.ste == "approx_sign":
        return approx_sign_grad(grad, saved), None, None
    return ste_masked_grad(grad, saved), None, None


torch.library.register_autograd("ctmq::quantize_act", _act_backward, setup_context=_act_setup)


# ---------------------------------------------------------------------- weights
def _rows_dense(w: Tensor) -> Tensor:
    """w dense with each output channel one run of K elements (contiguous or
    channels_last both are); otherwise a contiguous copy."""
    if is_dense(w) and (w.dim() < 2 or w.stride(0) * w.shape[0] == w.numel()):
        return w
    return w.contiguous()


def _weight_scale_shape(w: Tensor):
    return (w.shape[0],) + (1,) * (w.dim() - 1)


@torch.library.custom_op("ctmq::quantize_weight", mutates_args=(), device_types=("cpu", "cuda"))
def quantize_weight(w: Tensor, bits: int, ste: str) -> tuple[Tensor, Tensor]:
    """(alpha_c * Q_bits(w / alpha_c), alpha) per output channel (dim 0);
    alpha = mean|w_c| at 1 bit (XNOR-Net), max|w_c| above."""
    _check_bits(bits)
    _check_ste(ste, bits)
    w = _rows_dense(w)
    if w.numel() == 0:
        return torch.empty_like(w), w.new_zeros((w.shape[0],), dtype=torch.float32)
    if _use_triton(w):
        return _kernels().quantize_weight(w, bits)
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    v = w.to(compute)
    a = v.abs().reshape(w.shape[0], -1)
    alpha = a.mean(1) if bits == 1 else a.amax(1)
    safe = torch.where(alpha > 0, alpha, 1.0).view(_weight_scale_shape(w))
    out = (ctmq_levels(v / safe, bits) * alpha.view(_weight_scale_shape(w))).to(w.dtype)
    return out, alpha.to(torch.float32)


@quantize_weight.register_fake
def _(w, bits, ste):
    _check_bits(bits)
    _check_ste(ste, bits)
    w = _rows_dense(w)
    return torch.empty_like(w), w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.custom_op("ctmq::quantize_weight_grad", mutates_args=(),
                         device_types=("cpu", "cuda"))
def quantize_weight_grad(grad: Tensor, w: Tensor, alpha: Tensor, ste: str) -> Tensor:
    """grad * STE'(w / alpha_c); grad and w share strides, rows dense."""
    if grad.numel() == 0:
        return torch.empty_like(grad)
    if _use_triton(grad):
        return _kernels().quantize_weight_grad(grad, w, alpha, ste == "approx_sign")
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    safe = torch.where(alpha > 0, alpha, 1.0).to(compute).view(_weight_scale_shape(w))
    v = w.to(compute) / safe
    slope = _approx_sign_slope(v) if ste == "approx_sign" else _clipped_slope(v)
    return (grad.to(compute) * slope).to(grad.dtype)


@quantize_weight_grad.register_fake
def _(grad, w, alpha, ste):
    return torch.empty_like(grad)


def _weight_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.ste = inputs[3]
    ctx.shape, ctx.stride = output.shape, output.stride()


def _weight_grad_backward(ctx, grad_grad):
    w, alpha = ctx.saved_tensors
    gg = quantize_weight_grad(restride(grad_grad, ctx.shape, ctx.stride), w, alpha, ctx.ste)
    return gg, None, None, None


torch.library.register_autograd("ctmq::quantize_weight_grad", _weight_grad_backward,
                                setup_context=_weight_grad_setup)


def _weight_setup(ctx, inputs, output):
    w, _bits, ste = inputs
    out, alpha = output
    ctx.mark_non_differentiable(alpha)
    ctx.ste = ste
    ctx.shape, ctx.stride = out.shape, out.stride()
    ctx.save_for_backward(restride(w, out.shape, out.stride()), alpha)


def _weight_backward(ctx, grad_out, _grad_alpha):
    w, alpha = ctx.saved_tensors
    grad = quantize_weight_grad(restride(grad_out, ctx.shape, ctx.stride), w, alpha, ctx.ste)
    return grad, None, None


torch.library.register_autograd("ctmq::quantize_weight", _weight_backward,
                                setup_context=_weight_setup)


# ------------------------------------------------------------- binary kernels
# Packed format (DESIGN.md): NHWC int32 words, bit j of word w = channel 32w+j,
# bit 1 = +1. CPU tensors: the C++ kernels (csrc/cpu); CUDA tensors, or CPU
# tensors under force_triton(): the Triton kernels (ctmq_kernels/binary.py).
# Inference only: these take no part in autograd.
BMMA_MIN_CAPABILITY = (8, 0)  # mma.sync with b1 operands and .and.popc: Ampere and later
_bmma_built = None
_capability = {}


def bmma_built() -> bool:
    """True when ctmq._C holds the binary tensor-core kernel for CUDA (built
    with nvcc against a CUDA build of torch)."""
    global _bmma_built
    if _bmma_built is None:
        _bmma_built = (_backend.has_extension() and hasattr(torch.ops.ctmq, "binary_conv2d_bmma")
                       and torch._C._dispatch_has_kernel_for_dispatch_key(
                           "ctmq::binary_conv2d_bmma", "CUDA"))
    return _bmma_built


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = tuple(torch.cuda.get_device_capability(index))
    return _capability[index]


def _check_bmma(device: torch.device):
    if not bmma_built():
        raise RuntimeError("ctmq binary kernel 'bmma' was chosen, but ctmq._C was built without its "
                           "CUDA kernels: rebuild with nvcc and a CUDA build of torch (and "
                           "CTMQ_SKIP_CUDA_BUILD unset), or use ctmq.binary.use_kernel('triton')")
    capability = cuda_capability(device)
    if capability < BMMA_MIN_CAPABILITY:
        raise RuntimeError(f"ctmq binary kernel 'bmma' needs a GPU of compute capability "
                           f"{BMMA_MIN_CAPABILITY[0]}.{BMMA_MIN_CAPABILITY[1]} or newer (binary "
                           f"tensor cores); {device} is {capability[0]}.{capability[1]}: use "
                           f"ctmq.binary.use_kernel('triton')")


def binary_backend(t: Tensor) -> str:
    """"bmma", "triton" or "cpp": which binary conv kernel runs for tensors on
    t's device. CUDA: the kernel chosen by ctmq.binary.use_kernel (default
    CTMQ_BINARY_KERNEL, else "triton"), checked to run on this device."""
    if t.device.type == "cuda":
        kernel = _backend.cuda_binary_kernel()
        if kernel == "bmma":
            _check_bmma(t.device)
        return kernel
    if t.device.type == "cpu" and _backend.triton_forced():
        return "triton"
    if t.device.type != "cpu":
        raise NotImplementedError(f"ctmq's binary kernels run on CPU and CUDA tensors, "
                                  f"got a {t.device.type} tensor")
    _backend.extension()  # a clear error when ctmq._C is not built
    return "cpp"


def pack_bits(x: Tensor) -> Tensor:
    """float (N, C, H, W), any strides -> int32 (N, H, W, ceil(C/32)). On CUDA
    the Triton kernel packs for either conv kernel (ctmq._C has no CUDA pack)."""
    if x.device.type == "cuda" or binary_backend(x) == "triton":
        return _backend.triton_kernels("binary").pack_bits(x)
    return torch.ops.ctmq.pack_bits(x)


def pack_bits_ref(x: Tensor) -> Tensor:
    """Reference of pack_bits in torch ops (any device)."""
    n, c, h, w = x.shape
    words = (c + 31) // 32
    bits = (x >= 0).permute(0, 2, 3, 1).to(torch.int64)
    bits = torch.nn.functional.pad(bits, (0, 32 * words - c)).view(n, h, w, words, 32)
    shifts = torch.arange(32, dtype=torch.int64, device=x.device)
    word = (bits << shifts).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def binary_weight_gemm(bits: Tensor) -> tuple[Tensor, Tensor]:
    """(O, KH, KW, words) int32 -> the C++ kernel's weight layout and tap popcounts."""
    binary_backend(bits)
    return torch.ops.ctmq.binary_weight_gemm(bits)


def binary_weight_layout(bits: Tensor, backend: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(gemm, tap_popc): the weight in the form `backend`'s kernel reads besides
    the bits, made once per weight: binary_weight_gemm(bits) for "cpp",
    (None, tap_popcounts(bits)) for "bmma", (None, None) for "triton"."""
    if backend == "cpp":
        return binary_weight_gemm(bits)
    if backend == "bmma":
        return None, tap_popcounts(bits)
    return None, None


def binary_conv2d(x: Tensor, in_channels: int, bits: Tensor, gemm: Optional[Tensor],
                  tap_popc: Optional[Tensor], stride, padding, dilation, scale: Optional[Tensor],
                  bias: Optional[Tensor], residual: Optional[Tensor], packed_out: bool) -> Tensor:
    """XNOR-popcount conv of packed x with packed weight bits (O, KH, KW, words),
    epilogue ((conv * scale) + bias) + residual; gemm/tap_popc:
    binary_weight_layout(bits, binary_backend(x)), or None to make it here."""
    backend = binary_backend(x)
    if backend == "triton":
        return _backend.triton_kernels("binary").binary_conv2d(
            x, in_channels, bits, stride, padding, dilation, scale, bias, residual, packed_out)
    if tap_popc is None:
        gemm, tap_popc = binary_weight_layout(bits, backend)
    if backend == "bmma":
        return torch.ops.ctmq.binary_conv2d_bmma(x, in_channels, bits, tap_popc, stride, padding,
                                                 dilation, scale, bias, residual, packed_out)
    return torch.ops.ctmq.binary_conv2d(x, in_channels, gemm, tap_popc, bits.shape[0],
                                        list(bits.shape[1:3]), stride, padding, dilation,
                                        scale, bias, residual, packed_out)


def tap_popcounts(bits: Tensor) -> Tensor:
    """(O, KH, KW, words) int32 -> (O, KH*KW) int32 popcount of each channel's tap."""
    v = bits.to(torch.int64) & 0xFFFFFFFF  # the 32 bits, unsigned
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = (v * 0x01010101 & 0xFFFFFFFF) >> 24
    return v.sum(-1).flatten(1).to(torch.int32).contiguous()


def binary_cpu_path(request: str = "") -> str:
    """The CPU binary kernels' code path ("avx512-vpopcntdq", "avx2" or "scalar");
    request "avx2"/"scalar" caps it, "auto" restores run-time detection."""
    _backend.extension()
    return torch.ops.ctmq.set_cpu_path(request)


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@_cpp_fake("pack_bits")
def _(x):
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3], (x.shape[1] + 31) // 32),
                       dtype=torch.int32)


def _binary_conv_fake(x, out_channels, kernel_size, stride, padding, dilation, packed_out):
    oh = conv_output_size(x.shape[1], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[2], kernel_size[1], stride[1], padding[1], dilation[1])
    if packed_out:
        return x.new_empty((x.shape[0], oh, ow, (out_channels + 31) // 32))
    return x.new_empty((x.shape[0], out_channels, oh, ow), dtype=torch.float32)


@_cpp_fake("binary_conv2d_bmma")
def _(x, in_channels, bits, tap_popc, stride, padding, dilation, scale, bias, residual,
      packed_out):
    return _binary_conv_fake(x, bits.shape[0], bits.shape[1:3], stride, padding, dilation,
                             packed_out)


@_cpp_fake("binary_weight_gemm")
def _(bits):
    groups, taps = (bits.shape[0] + 7) // 8, bits.shape[1] * bits.shape[2]
    k = taps * ((bits.shape[3] + 1) // 2)
    return (bits.new_empty((groups, k, 8), dtype=torch.int64),
            bits.new_empty((groups, taps, 8), dtype=torch.int64))


@_cpp_fake("binary_conv2d")
def _(x, in_channels, weight, tap_popc, out_channels, kernel_size, stride, padding, dilation,
      scale, bias, residual, packed_out):
    return _binary_conv_fake(x, out_channels, kernel_size, stride, padding, dilation, packed_out)
