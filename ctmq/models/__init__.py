"""Binarizable CNNs: ResNet-18/34 (ImageNet and CIFAR stems, Bi-Real or basic
blocks), VGG-Small (CIFAR) and ReActNet-A (ImageNet and CIFAR stems).

Each MODELS entry is called as MODELS[name](num_classes, stem=..., block=...,
width=..., in_channels=...) (block None for models without a block choice),
and each model's `config` rebuilds it: MODELS[name](**model.config).
"""

from .reactnet import ReActNetA, reactnet_a
from .resnet import ResNet, ResNet18, load_torchvision_weights, resnet18, resnet34
from .vgg import VGGSmall, vgg_small

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg_small": vgg_small,
    "reactnet_a": reactnet_a,
}


def zoo_name(model):
    """The MODELS name of a zoo model, else None."""
    if isinstance(model, (ResNet, VGGSmall, ReActNetA)):
        return model.architecture["name"]
    return None


__all__ = [
    "MODELS",
    "zoo_name",
    "ResNet",
    "ResNet18",
    "VGGSmall",
    "ReActNetA",
    "resnet18",
    "resnet34",
    "vgg_small",
    "reactnet_a",
    "load_torchvision_weights",
]
