"""The runtime's function for each op of the vocabulary (ctmq.artifact.OPS):
LOWER[op](attrs, name) -> a callable of the node's input values, made once at
load from the node's checked attributes (tensors on the runtime's device).

Binary convolutions run on ctmq's XNOR-popcount kernels (C++ on the CPU; on
CUDA the kernel chosen with ctmq.binary.use_kernel) with the folded scale/bias
and the residual in their epilogue; every other op is the torch function the
trained model calls, so the logits equal the model's eval logits.
"""

from typing import Callable

import torch
import torch.nn.functional as F

from .. import binary, ops

LOWER: dict[str, Callable] = {}


def lowering(name):
    def register(fn):
        LOWER[name] = fn
        return fn

    return register


def max_pool2d(x, kernel, stride, padding):
    """F.max_pool2d's values, fast on the CPU too: torch's NCHW CPU pool is about
    15x slower than oneDNN's (3.2 vs 0.2 ms for ResNet-18's stem pool at batch 1
    on a 2-core AVX-512 VM, conversions included). A max is exact in any order;
    oneDNN may keep the other zero where +0.0 and -0.0 tie (no later layer can
    tell: sign() maps both to +1, adding either to a nonzero value gives the
    same), and it ignores NaN, which is why the CPU runtime refuses NaN input."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.max_pool2d(x, kernel, stride, padding)
    if torch.backends.mkldnn.is_available():
        return torch.mkldnn_max_pool2d(
            x.to_mkldnn(), list(kernel), list(stride), list(padding)
        ).to_dense()
    return F.max_pool2d(
        x.contiguous(memory_format=torch.channels_last), kernel, stride, padding
    ).contiguous()


@lowering("conv2d")
def _conv2d(a, name):
    w, b = a["weight"], a["bias"]
    stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]
    return lambda x: F.conv2d(x, w, b, stride, padding, dilation, groups)


@lowering("batch_norm")
def _batch_norm(a, name):
    w, b, mean, var, eps = a["weight"], a["bias"], a["mean"], a["var"], a["eps"]
    return lambda x: F.batch_norm(x, mean, var, w, b, False, 0.0, eps)


@lowering("max_pool2d")
def _max_pool2d(a, name):
    kernel, stride, padding = a["kernel"], a["stride"], a["padding"]
    return lambda x: max_pool2d(x, kernel, stride, padding)


@lowering("avg_pool2d")
def _avg_pool2d(a, name):
    kernel, stride, padding = a["kernel"], a["stride"], a["padding"]
    ceil_mode, count_include_pad = a["ceil_mode"], a["count_include_pad"]
    return lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)


@lowering("binary_conv")
def _binary_conv(a, name):
    bits, in_channels = a["weight"], a["in_channels"]
    spare = in_channels % 32
    if spare:  # the kernels count every bit: clear those past in_channels (no host sync)
        bits = bits.clone()
        bits[..., -1] &= (1 << spare) - 1
    weight = binary.PackedWeight(bits, in_channels)
    scale, bias = a["scale"], a["bias"]
    stride, padding, dilation = a["stride"], a["padding"], a["dilation"]
    packed = a["output"] == "packed"
    input_bias = a["input_bias"].view(1, -1, 1, 1) if a["input_bias"] is not None else None
    # inference on tensors of one device: the ops' kernels without the dispatcher
    pack_bits = ops.device_kernel(ops.pack_bits, bits.device.type)
    conv = ops.device_kernel(ops.binary_conv2d, bits.device.type)

    def run(x, residual=None):
        channels = x.channels if isinstance(x, binary.PackedActivation) else x.shape[1]
        if channels != in_channels:  # same word count, other channels: wrong values otherwise
            raise ValueError(
                f"binary_conv node {name!r} expects {in_channels} input channels, got {channels}"
            )
        if input_bias is not None:  # RSign: the sign of x + bias (the model's own expression)
            x = x + input_bias
        xb = x.bits if isinstance(x, binary.PackedActivation) else pack_bits(x)
        gemm, tap_popc = weight.layout_for(bits, ops.binary_backend(xb))
        y = conv(
            xb,
            in_channels,
            bits,
            gemm,
            tap_popc,
            stride,
            padding,
            dilation,
            scale,
            bias,
            residual,
            packed,
        )
        return binary.PackedActivation(y, weight.out_channels) if packed else y

    return run


@lowering("add")
def _add(a, name):
    return torch.add


@lowering("concat")
def _concat(a, name):
    return lambda *xs: torch.cat(xs, 1)


@lowering("hardtanh")
def _hardtanh(a, name):
    low, high = a["min_val"], a["max_val"]
    return lambda x: F.hardtanh(x, low, high)


@lowering("relu")
def _relu(a, name):
    return F.relu


@lowering("prelu")
def _prelu(a, name):
    w = a["weight"]
    return lambda x: F.prelu(x, w)


@lowering("rprelu")
def _rprelu(a, name):
    """ctmq.nn.RPReLU's forward: prelu(x + shift_in) + shift_out, per channel."""
    w = a["weight"]
    shift_in, shift_out = (a[k].view(1, -1, 1, 1) for k in ("shift_in", "shift_out"))
    return lambda x: F.prelu(x + shift_in, w) + shift_out


@lowering("leaky_relu")
def _leaky_relu(a, name):
    slope = a["negative_slope"]
    return lambda x: F.leaky_relu(x, slope)


@lowering("global_avg_pool")
def _global_avg_pool(a, name):
    return lambda x: torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@lowering("adaptive_avg_pool2d")
def _adaptive_avg_pool2d(a, name):
    size = a["output_size"]
    return lambda x: F.adaptive_avg_pool2d(x, size)


@lowering("flatten")
def _flatten(a, name):
    return lambda x: torch.flatten(x, 1)


@lowering("linear")
def _linear(a, name):
    w, b = a["weight"], a["bias"]
    return lambda x: F.linear(x, w, b)


@lowering("output")
def _output(a, name):
    return lambda x: x
