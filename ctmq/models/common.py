"""What the zoo's models share: argument checks, channel scaling, the FP
activation of a quantized conv's input, weight init."""

import torch.nn.functional as F
from torch import nn

from ..quant import FULL_PRECISION


def act_input(x, conv):
    """hardtanh(x) when conv runs at full precision (a_bits = 32), else x: the
    real-valued limit of the activation quantizers (Q_k clamps to [-1, 1]), so
    every stage of the bit-depth ladder sees the same function up to quantization."""
    return F.hardtanh(x) if conv.a_bits == FULL_PRECISION else x


def check_args(model, num_classes, stem, stems, block, blocks, width):
    """ValueError naming the first bad constructor argument of `model`."""
    if stem not in stems:
        raise ValueError(f"stem must be one of {stems} for {model}, got {stem!r}")
    if block not in blocks:
        choice = f"one of {blocks}" if blocks != (None,) else "None (it has no block choice)"
        raise ValueError(f"block must be {choice} for {model}, got {block!r}")
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if isinstance(num_classes, bool) or not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def scaled(channels, width):
    """round(channels * width), at least 1."""
    return max(1, int(round(channels * width)))


def init_weights(model):
    """Kaiming-normal (fan_out) convs, BN gamma 1 and beta 0; the rest as torch does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
