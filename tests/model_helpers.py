"""Models with weights and statistics away from their defaults, shared by the
deploy, executor and native runtime tests: so that a folded BN, an RSign
threshold or an RPReLU shift that a runtime dropped would change the logits."""

import torch
from torch import nn

from ctmq.models import resnet18
from ctmq.nn import RPReLU, RSign, set_bits


def randomized(model, seed=1):
    """BN statistics and affine parameters, RSign/RPReLU shifts set from a
    seeded generator; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            elif isinstance(m, (RSign, RPReLU)):
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def binarized_resnet18(stem, block, size, seed=0):
    """A W1A1 ResNet-18 (width 0.25, 10 classes) whose BN statistics come from
    three training-mode passes over random images of side `size`."""
    torch.manual_seed(seed)
    m = resnet18(10, stem=stem, block=block, width=0.25)
    set_bits(m, 1, 1)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, size, size))
    return m.eval()
