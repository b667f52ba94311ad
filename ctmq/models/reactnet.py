"""ReActNet-A (Liu et al. 2020, "ReActNet: Towards Precise Binary Neural Network
with Generalized Activation Functions"): the MobileNetV1 layout with every 3x3
depthwise-separable pair replaced by a binary 3x3 conv and a binary 1x1 conv,
each with a real-valued shortcut. Structure and module names follow the
official mobilenet/reactnet.py:

* feature.0: FP 3x3 conv (32, stride 2 for stem "imagenet", 224 x 224 input;
  stride 1 for "cifar", 32 x 32 input) + BN, no activation;
* feature.1..13: blocks with channels 64, 128 x 2, 256 x 2, 512 x 6, 1024 x 2,
  stride 2 where the channels double (not into 64);
* block: move11 (RSign) -> binary_3x3 (QConv2d) -> bn1, + x (average pooled
  where strided) -> prelu1 (RPReLU); move21 (RSign) -> binary_pw (1x1) -> bn2,
  + its input -> prelu2 (RPReLU). Where the channels double, two 1x1 convs
  (binary_pw_down1/2, bn2_1/2), each + the input, are concatenated;
* pool1: global average pool; fc: FP linear.

The official LearnableBias / nn.PReLU / LearnableBias triple is one RPReLU
(prelu1, prelu2: shift_in, weight, shift_out); the official HardBinaryConv
(mean |W| per output channel times sign W) is QConv2d at w_bits = 1, whose
a_bits = 1 quantizer is the sign. At a_bits = 32 a quantized conv's input passes
through hardtanh, as in the ResNets. width scales the channel list as
round(32 width) * (c / 32), at least 1, so doubling stays exact. The shortcut
pool is AvgPool2d(2, ceil_mode=True): the official AvgPool2d(2, 2) on even sizes,
and the strided conv's output size on odd ones.
"""

import torch
from torch import nn

from ..nn import QConv2d, RPReLU, RSign, conv_bn
from ..quant import FULL_PRECISION
from .common import act_input, check_args, init_weights, scaled

STEMS = ("imagenet", "cifar")
CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class ReActBlock(nn.Module):
    """The official BasicBlock: binary 3x3 conv then binary 1x1 conv(s), each with
    a shortcut, RSign before and RPReLU after each."""

    def __init__(self, cin, cout, stride, **qkw):
        super().__init__()
        self.down = cout != cin  # cout == 2 cin: two 1x1 convs, concatenated
        self.move11 = RSign(cin)
        self.binary_3x3 = QConv2d(cin, cin, 3, stride=stride, padding=1, bias=False, **qkw)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pooling = (
            nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False) if stride == 2 else None
        )
        self.prelu1 = RPReLU(cin)
        self.move21 = RSign(cin)
        if self.down:
            self.binary_pw_down1 = QConv2d(cin, cin, 1, bias=False, **qkw)
            self.binary_pw_down2 = QConv2d(cin, cin, 1, bias=False, **qkw)
            self.bn2_1 = nn.BatchNorm2d(cin)
            self.bn2_2 = nn.BatchNorm2d(cin)
        else:
            self.binary_pw = QConv2d(cin, cout, 1, bias=False, **qkw)
            self.bn2 = nn.BatchNorm2d(cout)
        self.prelu2 = RPReLU(cout)

    def forward(self, x):
        out1 = conv_bn(self.binary_3x3, self.bn1, act_input(self.move11(x), self.binary_3x3))
        if self.pooling is not None:
            x = self.pooling(x)
        out1 = self.prelu1(x + out1)
        if self.down:
            y = act_input(self.move21(out1), self.binary_pw_down1)
            out2 = torch.cat(
                [
                    conv_bn(self.binary_pw_down1, self.bn2_1, y) + out1,
                    conv_bn(self.binary_pw_down2, self.bn2_2, y) + out1,
                ],
                dim=1,
            )
        else:
            y = act_input(self.move21(out1), self.binary_pw)
            out2 = conv_bn(self.binary_pw, self.bn2, y) + out1
        return self.prelu2(out2)


class ReActNetA(nn.Module):
    """ReActNet-A; config holds the constructor arguments that rebuild it."""

    def __init__(
        self,
        num_classes=1000,
        stem="imagenet",
        block=None,
        width=1.0,
        in_channels=3,
        w_bits=FULL_PRECISION,
        a_bits=FULL_PRECISION,
        act_ste="approx_sign",
    ):
        super().__init__()
        check_args("reactnet_a", num_classes, stem, STEMS, block, (None,), width)
        self.config = dict(
            num_classes=num_classes, stem=stem, block=block, width=width, in_channels=in_channels
        )
        base = scaled(CHANNELS[0], width)
        chans = [base * (c // CHANNELS[0]) for c in CHANNELS]
        stride = 2 if stem == "imagenet" else 1
        layers = [
            nn.Sequential(
                nn.Conv2d(in_channels, chans[0], 3, stride, 1, bias=False), nn.BatchNorm2d(chans[0])
            )
        ]
        qkw = dict(w_bits=w_bits, a_bits=a_bits, act_ste=act_ste)
        for i in range(1, len(CHANNELS)):
            strided = CHANNELS[i] != CHANNELS[i - 1] and CHANNELS[i] != 64
            layers.append(ReActBlock(chans[i - 1], chans[i], 2 if strided else 1, **qkw))
        self.feature = nn.Sequential(*layers)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[-1], num_classes)
        init_weights(self)

    @property
    def architecture(self):
        """What an exported artifact records: the zoo name and the arguments."""
        return dict(self.config, name="reactnet_a")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool1(self.feature(x)), 1))


def reactnet_a(num_classes=1000, stem="imagenet", block=None, width=1.0, in_channels=3, **qkw):
    """ReActNet-A: FP first conv and fc, 31 quantized convs (13 3x3, 18 1x1).
    block must be None. qkw: w_bits, a_bits, act_ste."""
    return ReActNetA(
        num_classes, stem=stem, block=block, width=width, in_channels=in_channels, **qkw
    )
