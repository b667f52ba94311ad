"""Output shapes of the binary kernels, shared by the Triton launchers here and
by ctmq.ops (fakes, CPU and CUDA kernels): one formula per op. Needs torch
only, not triton."""

import torch
from torch import Tensor


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """torch.nn.Conv2d's output size along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def words(channels: int) -> int:
    """int32 words per pixel of `channels` packed channels."""
    return (channels + 31) // 32


def pack_bits_output_shape(shape) -> tuple:
    n, c, h, w = shape
    return (n, h, w, words(c))


def binary_conv2d_output_shape(
    x_shape, bits_shape, stride, padding, dilation, packed_out: bool
) -> tuple:
    """(N, O, OH, OW), or (N, OH, OW, ceil(O/32)) packed, of a binary conv of
    packed x (N, H, W, words) with packed weight bits (O, KH, KW, words)."""
    n, h, w, _ = x_shape
    o, kh, kw, _ = bits_shape
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    return (n, oh, ow, words(o)) if packed_out else (n, o, oh, ow)


def binary_conv2d_empty(
    x: Tensor, bits_shape, stride, padding, dilation, packed_out: bool
) -> Tensor:
    """An uninitialized binary conv output on x's device: float32 (N, O, OH,
    OW), or packed int32 (N, OH, OW, ceil(O/32))."""
    shape = binary_conv2d_output_shape(x.shape, bits_shape, stride, padding, dilation, packed_out)
    return x.new_empty(shape, dtype=torch.int32 if packed_out else torch.float32)
