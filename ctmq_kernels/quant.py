"""Fused fake-quantization kernels (forward + straight-through backward).

Every elementwise kernel walks the tensor in its *memory* order (the caller
passes a dense tensor of any stride order, e.g. channels_last), 8 elements per
row of a [R, 8] tile, so the STE mask of one row packs into one byte:
bit j of mask byte i belongs to memory element 8 * i + j. The backward kernels
read that byte mask (1/8 byte per element) instead of a saved float tensor:
fwd+bwd then moves 4 tensor passes plus 1/4 byte per element of mask (the
minimum plus 3% for 2-byte dtypes, 1.6% for float32).

Semantics are those of ctmq/ops/reference.py, which the tests compare against
bit for bit (the 1-bit weight scale mean|w| within a few ulps: its summation
order differs); see docs/design.md, "Quantizer semantics".
"""

import torch
import triton
import triton.language as tl

ROWS = 512  # 4096 elements per program: 16 per thread at 8 warps
NUM_WARPS = 8
WEIGHT_BLOCK = 1024


@triton.jit
def _round_half_even(v):
    # nearbyint() without libdevice (which the interpreter lacks); exact in fp32.
    f = tl.floor(v)
    d = v - f
    half = f * 0.5
    odd = tl.floor(half) != half
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _store_cast(ptr, y, mask, SOFT_BF16: tl.constexpr):
    # The interpreter truncates fp32 -> bf16; round to nearest even by hand there
    # (torch's c10::BFloat16 rounding) so interpreted and compiled kernels agree.
    if SOFT_BF16 and ptr.dtype.element_ty == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        b = b + (((b >> 16) & 1) + 0x7FFF)
        h = tl.where(y != y, 0x7FC0, (b >> 16)).to(tl.uint16)
        tl.store(ptr, h.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(numel, R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    return rows, offs, offs < numel


@triton.jit
def _store_bits(mask_ptr, rows, keep, numel):
    byte = tl.sum(keep.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1)
    tl.store(mask_ptr + rows, byte.to(tl.uint8), mask=rows * 8 < numel)


@triton.jit
def _load_bits(mask_ptr, rows, numel):
    byte = tl.load(mask_ptr + rows, mask=rows * 8 < numel, other=0).to(tl.int32)
    return ((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1).to(tl.float32)


@triton.jit
def _ctmq_levels(v, n, BINARY: tl.constexpr):
    # Q_k(v) = 2 floor((clamp(v)+1)/2 n + 1/2)/n - 1 = (2 floor(clamp(v) n/2) + 1) / n
    # for odd n; the second form keeps the sign of v near 0 exact.
    if BINARY:
        return tl.where(v >= 0, 1.0, tl.where(v < 0, -1.0, v))  # NaN stays NaN
    c = tl.where(v > 1.0, 1.0, tl.where(v < -1.0, -1.0, v))
    j = 2.0 * tl.floor(c * (n * 0.5)) + 1.0
    return tl.div_rn(j, n)


# --------------------------------------------------------------------- affine
@triton.jit
def _fake_quant_affine_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    inv_scale_ptr,
    zp_ptr,
    numel,
    ch_stride,
    nch,
    qmin,
    qmax,
    PER_CHANNEL: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    R: tl.constexpr,
):
    rows, offs, inb = _tile(numel, R)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        ch = (offs // ch_stride) % nch
        s = tl.load(scale_ptr + ch, mask=inb, other=1.0)
        inv = tl.load(inv_scale_ptr + ch, mask=inb, other=1.0)
        zp = tl.load(zp_ptr + ch, mask=inb, other=0).to(tl.float32)
    else:
        s = tl.load(scale_ptr)
        inv = tl.load(inv_scale_ptr)
        zp = tl.load(zp_ptr).to(tl.float32)
    # torch's CUDA kernels (as measured on an H200, torch 2.11), then
    # (clamp(qval) - zp) * scale in fp32, mask = qmin <= qval <= qmax:
    r = _round_half_even(x * inv)
    if PER_CHANNEL:
        # qval = int64(nearbyint(x * inv)) + zp: the conversion saturates (NaN
        # and -inf to INT64_MIN, +inf to INT64_MAX), the int64 add wraps, so an
        # out-of-range value lands at qmin or qmax by the sign of zp
        low = (r != r) | (r <= -9.223372036854775808e18)
        high = r >= 9.223372036854775808e18
        to_max = (low & (zp < 0.0)) | (high & (zp <= 0.0))
        to_min = (low & (zp >= 0.0)) | (high & (zp > 0.0))
        q = tl.where(to_max, float("inf"), tl.where(to_min, float("-inf"), r + zp))
    else:
        # qval = int64(zp + nearbyint(x * inv)), a float add: NaN -> INT64_MIN
        q = r + zp
        q = tl.where(q != q, float("-inf"), q)
    keep = (q >= qmin) & (q <= qmax) & inb
    y = (tl.minimum(tl.maximum(q, qmin), qmax) - zp) * s
    _store_cast(out_ptr + offs, y, inb, SOFT_BF16)
    _store_bits(mask_ptr, rows, keep, numel)


@triton.jit
def _masked_grad_kernel(g_ptr, mask_ptr, out_ptr, numel, SOFT_BF16: tl.constexpr, R: tl.constexpr):
    rows, offs, inb = _tile(numel, R)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    _store_cast(out_ptr + offs, g * _load_bits(mask_ptr, rows, numel), inb, SOFT_BF16)


# ----------------------------------------------------------------- activations
@triton.jit
def _quantize_act_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    numel,
    n,
    BINARY: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    R: tl.constexpr,
):
    rows, offs, inb = _tile(numel, R)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    _store_cast(out_ptr + offs, _ctmq_levels(x, n, BINARY), inb, SOFT_BF16)
    _store_bits(mask_ptr, rows, (x >= -1.0) & (x <= 1.0) & inb, numel)


@triton.jit
def _approx_sign_grad_kernel(
    g_ptr, x_ptr, out_ptr, numel, SOFT_BF16: tl.constexpr, R: tl.constexpr
):
    rows, offs, inb = _tile(numel, R)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    d = 2.0 - 2.0 * tl.abs(x)
    _store_cast(out_ptr + offs, g * tl.where(d > 0.0, d, 0.0), inb, SOFT_BF16)


# --------------------------------------------------------------------- weights
@triton.jit
def _quantize_weight_kernel(
    w_ptr,
    out_ptr,
    alpha_ptr,
    K,
    K_float,
    n,
    BINARY: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per output channel: pass 1 reduces alpha (mean|w| at 1 bit,
    # max|w| above), pass 2 quantizes the row, which is still in L1/L2.
    base = tl.program_id(0).to(tl.int64) * K
    acc = tl.zeros([BLOCK], tl.float32)
    nan = tl.zeros([BLOCK], tl.int32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(w_ptr + base + offs, mask=offs < K, other=0.0).to(tl.float32))
        nan = nan | (a != a).to(tl.int32)
        if BINARY:
            acc += a
        else:
            acc = tl.maximum(acc, a)
    if BINARY:
        alpha = tl.div_rn(tl.sum(acc, axis=0), K_float)  # K == 1 would be a constexpr
    else:
        alpha = tl.max(acc, axis=0)
    alpha = tl.where(tl.max(nan, axis=0) > 0, float("nan"), alpha)  # as torch's amax/mean
    tl.store(alpha_ptr + tl.program_id(0), alpha)
    safe = tl.where(alpha > 0.0, alpha, 1.0)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < K
        w = tl.load(w_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        y = _ctmq_levels(tl.div_rn(w, safe), n, BINARY) * alpha
        _store_cast(out_ptr + base + offs, y, m, SOFT_BF16)


@triton.jit
def _quantize_weight_grad_kernel(
    g_ptr,
    w_ptr,
    alpha_ptr,
    out_ptr,
    numel,
    K,
    APPROX_SIGN: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    R: tl.constexpr,
):
    rows, offs, inb = _tile(numel, R)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + offs // K, mask=inb, other=1.0)
    v = tl.div_rn(w, tl.where(alpha > 0.0, alpha, 1.0))
    if APPROX_SIGN:
        d = 2.0 - 2.0 * tl.abs(v)
        dv = tl.where(d > 0.0, d, 0.0)
    else:
        dv = ((v >= -1.0) & (v <= 1.0)).to(tl.float32)
    _store_cast(out_ptr + offs, g * dv, inb, SOFT_BF16)


# ------------------------------------------------------------------- launchers
# Callers (ctmq.ops) pass dense tensors, non-empty, in any stride order; outputs
# share the input's strides, masks follow memory order.
def _soft_bf16(t):
    return t.device.type == "cpu"  # CPU tensors reach Triton only under the interpreter


# No FMA contraction: x * inv - floor(x * inv) fused would round differently
# from torch's nearbyint(x * inv); every kernel keeps torch's op-by-op rounding.
# No flush to zero: with Triton's default (reflect FTZ), tl.floor compiles to
# cvt.rmi.ftz, which maps a negative denormal to +0 (level +1/n, not -1/n).
_EXACT = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def _grid(numel):
    return (triton.cdiv(numel, ROWS * 8),)


def _mask_like(x):
    return x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


def _launch_elementwise(kernel, like, *args, **constexprs):
    """One program per ROWS x 8 elements of `like`, with the shared launch options."""
    kernel[_grid(like.numel())](
        *args, SOFT_BF16=_soft_bf16(like), R=ROWS, num_warps=NUM_WARPS, **constexprs, **_EXACT
    )


def fake_quant_affine(x, scale, inv_scale, zero_point, qmin, qmax, ch_stride, nch, per_channel):
    """(out, packed STE mask) of torch.fake_quantize_per_{tensor,channel}_affine."""
    out, mask = torch.empty_like(x), _mask_like(x)
    _launch_elementwise(
        _fake_quant_affine_kernel,
        x,
        x,
        out,
        mask,
        scale,
        inv_scale,
        zero_point,
        x.numel(),
        ch_stride,
        nch,
        float(qmin),
        float(qmax),
        PER_CHANNEL=per_channel,
    )
    return out, mask


def masked_grad(grad, mask):
    out = torch.empty_like(grad)
    _launch_elementwise(_masked_grad_kernel, grad, grad, mask, out, grad.numel())
    return out


def quantize_act(x, bits):
    out, mask = torch.empty_like(x), _mask_like(x)
    _launch_elementwise(
        _quantize_act_kernel, x, x, out, mask, x.numel(), float(2**bits - 1), BINARY=bits == 1
    )
    return out, mask


def approx_sign_grad(grad, x):
    out = torch.empty_like(grad)
    _launch_elementwise(_approx_sign_grad_kernel, grad, grad, x, out, grad.numel())
    return out


def quantize_weight(w, bits):
    """w: dense, each output channel (dim 0) one contiguous run of K elements."""
    out = torch.empty_like(w)
    alpha = w.new_empty(w.shape[0], dtype=torch.float32)
    K = w.numel() // w.shape[0]
    block = min(WEIGHT_BLOCK, triton.next_power_of_2(K))
    _quantize_weight_kernel[(w.shape[0],)](
        w,
        out,
        alpha,
        K,
        float(K),
        float(2**bits - 1),
        BINARY=bits == 1,
        SOFT_BF16=_soft_bf16(w),
        BLOCK=block,
        num_warps=4,
        **_EXACT,
    )
    return out, alpha


def quantize_weight_grad(grad, w, alpha, approx_sign):
    out = torch.empty_like(grad)
    _launch_elementwise(
        _quantize_weight_grad_kernel,
        grad,
        grad,
        w,
        alpha,
        out,
        grad.numel(),
        grad.numel() // grad.shape[0],
        APPROX_SIGN=approx_sign,
    )
    return out
