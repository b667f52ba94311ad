"""Binarizable CNNs: ResNet-18 (ImageNet and CIFAR stems, Bi-Real or basic blocks)."""
from .resnet import ResNet18, load_torchvision_weights, resnet18

MODELS = {"resnet18": resnet18}

__all__ = ["MODELS", "ResNet18", "resnet18", "load_torchvision_weights"]
