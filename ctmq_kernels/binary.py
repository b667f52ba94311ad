"""Triton bit packing and implicit-GEMM XNOR-popcount convolution.

Same packed format and results as the C++ CPU kernels (csrc/cpu/binary_cpu.cpp):
NHWC int32 words, bit j of word w = channel 32w + j, bit 1 = +1; a tap outside
the image adds nothing, so each output is C * valid_taps - 2 * popc(a ^ w)
summed over its valid taps. Popcount is libdevice's popc on the GPU and a
SWAR bit trick in the interpreter (where libdevice calls fail); the same
kernel runs on both, chosen by a constexpr.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .shapes import binary_conv2d_empty, pack_bits_output_shape

PACK_BLOCK_P = 64  # pixels per program when packing
CONV_BLOCK_M = 32  # output pixels per program
CONV_BLOCK_N = 32  # output channels per program: one packed output word
CONV_STAGES = 1  # nothing to pipeline: one word per step
CONV_WARPS = 8
# An explicit register budget: left to itself, ptxas (triton 3.6's and 3.9's)
# caps some specializations at 64 registers and spills; 128 keeps every
# configuration of tests/triton_aot.py spill-free at 31-85 registers.
CONV_MAXNREG = 128


@triton.jit
def _popc(v, HW_POPC: tl.constexpr):
    if HW_POPC:
        return libdevice.popc(v)
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _pack_bits_kernel(x_ptr, out_ptr, C, H, W, Cw, sN, sC, sH, sW, P, BLOCK_P: tl.constexpr):
    # program (pixel block, word): word w of BLOCK_P pixels, from 32 channels
    pid = tl.program_id(0)
    word = tl.program_id(1)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    n = p // (H * W)
    hw = p % (H * W)
    h = hw // W
    w = hw % W
    c = word * 32 + tl.arange(0, 32)
    ok = (p[:, None] < P) & (c[None, :] < C)
    ptrs = (
        x_ptr + n[:, None].to(tl.int64) * sN + c[None, :] * sC + h[:, None] * sH + w[:, None] * sW
    )
    v = tl.load(ptrs, mask=ok, other=-1.0)
    bits = ((v >= 0) & ok).to(tl.int64) << tl.arange(0, 32)[None, :].to(tl.int64)
    tl.store(out_ptr + p.to(tl.int64) * Cw + word, tl.sum(bits, axis=1).to(tl.int32), mask=p < P)


@triton.jit
def _binary_conv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    N,
    C,
    H,
    W,
    Cw,
    O,
    OH,
    OW,
    KH,
    KW,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    PACKED: tl.constexpr,
    HW_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixel (n, oh, ow)
    oc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    M = N * OH * OW
    m_ok = m < M
    oc_ok = oc < O
    n = m // (OH * OW)
    ohw = m % (OH * OW)
    oh = ohw // OW
    ow = ohw % OW
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    valid = tl.zeros([BLOCK_M], tl.int32)
    for kh in range(0, KH):
        ih = oh * sh - ph + kh * dh
        for kw in range(0, KW):
            iw = ow * sw - pw + kw * dw
            tap_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            valid += tap_ok.to(tl.int32)
            # int32 offsets (the launcher checks that they fit): int64 ones
            # double the registers of the per-row state and make ptxas spill
            a_off = ((n * H + ih) * W + iw) * Cw
            b_off = ((oc * KH + kh) * KW + kw) * Cw
            tap = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
            for k in range(0, Cw):  # one word a step: wider steps spill too
                a = tl.load(x_ptr + (a_off + k), mask=tap_ok, other=0)
                b = tl.load(w_ptr + (b_off + k), mask=oc_ok, other=0)
                tap += _popc(a[:, None] ^ b[None, :], HW_POPC)
            acc += tl.where(tap_ok[:, None], tap, 0)  # a tap outside the image adds nothing
    val = valid[:, None] * C - 2 * acc
    y = val.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + oc, mask=oc_ok, other=1.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + oc, mask=oc_ok, other=0.0)[None, :]
    dst = (n.to(tl.int64)[:, None] * O + oc[None, :]) * (OH * OW) + (oh * OW + ow)[:, None]
    if HAS_RES:  # a shortcut, added last: ((conv * scale) + bias) + residual
        y = y + tl.load(res_ptr + dst, mask=m_ok[:, None] & oc_ok[None, :], other=0.0)
    if PACKED:
        # BLOCK_N == 32: this program's channels are exactly one output word
        Ow = (O + 31) // 32
        bit = ((y >= 0) & oc_ok[None, :]).to(tl.int64) << tl.arange(0, BLOCK_N)[None, :].to(
            tl.int64
        )
        word = tl.sum(bit, axis=1).to(tl.int32)
        tl.store(out_ptr + m.to(tl.int64) * Ow + pid_n, word, mask=m_ok)
    else:
        tl.store(out_ptr + dst, y, mask=m_ok[:, None] & oc_ok[None, :])


def _hw_popc(t):
    # CPU tensors reach Triton only under the interpreter, which lacks libdevice;
    # any other device (CUDA, or meta tensors compiled ahead of time) has it
    return t.device.type != "cpu"


def pack_bits(x):
    """float (N, C, H, W), any strides -> int32 (N, H, W, ceil(C/32))."""
    N, C, H, W = x.shape
    out = torch.empty(pack_bits_output_shape(x.shape), dtype=torch.int32, device=x.device)
    Cw = out.shape[3]
    P = N * H * W
    if P:
        grid = (triton.cdiv(P, PACK_BLOCK_P), Cw)
        _pack_bits_kernel[grid](x, out, C, H, W, Cw, *x.stride(), P, BLOCK_P=PACK_BLOCK_P)
    return out


def binary_conv2d(
    x, in_channels, wbits, stride, padding, dilation, scale, bias, residual, packed_out
):
    """x: int32 (N, H, W, Cw); wbits: int32 (O, KH, KW, Cw) (the packed format);
    arguments checked by ctmq::binary_conv2d (ctmq/ops/shapes.py)."""
    N, H, W, Cw = x.shape
    O, KH, KW, _ = wbits.shape
    out = binary_conv2d_empty(x, wbits.shape, stride, padding, dilation, packed_out)
    OH, OW = out.shape[1:3] if packed_out else out.shape[2:]
    M = N * OH * OW
    if M == 0 or O == 0:
        return out
    if max(x.numel(), wbits.numel(), M + CONV_BLOCK_M) >= 2**31:  # the kernel's int32 offsets
        raise ValueError(
            f"binary_conv2d (Triton): x ({x.numel()} words), the weight "
            f"({wbits.numel()} words) and the output ({M} pixels) must each stay "
            f"under 2^31: split the batch"
        )
    grid = (triton.cdiv(M, CONV_BLOCK_M), triton.cdiv(O, CONV_BLOCK_N))
    _binary_conv_kernel[grid](
        x,
        wbits,
        scale if scale is not None else out,
        bias if bias is not None else out,
        residual if residual is not None else out,
        out,
        N,
        in_channels,
        H,
        W,
        Cw,
        O,
        OH,
        OW,
        KH,
        KW,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        PACKED=packed_out,
        HW_POPC=_hw_popc(x),
        BLOCK_M=CONV_BLOCK_M,
        BLOCK_N=CONV_BLOCK_N,
        num_stages=CONV_STAGES,
        num_warps=CONV_WARPS,
        maxnreg=CONV_MAXNREG,
        enable_fp_fusion=False,
    )
    return out
