"""ctmq.models.resnet18: shapes, bit depths, torchvision weight loading."""

import pytest
import torch

from ctmq.models import load_torchvision_weights, resnet18
from ctmq.nn import QConv2d, set_bits


@pytest.mark.parametrize("stem,size", [("imagenet", 32), ("cifar", 8)])
@pytest.mark.parametrize("block", ["bireal", "basic"])
def test_resnet18_forward_backward(stem, size, block):
    m = resnet18(7, stem=stem, block=block, width=0.25)
    x = torch.randn(2, 3, size, size)
    for bits in (32, 4, 1):
        set_bits(m, bits, bits)
        y = m(x)
        assert y.shape == (2, 7) and torch.isfinite(y).all()
        y.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        m.zero_grad()


def test_resnet18_structure():
    m = resnet18(10, width=1.0)
    q = [mod for mod in m.modules() if isinstance(mod, QConv2d)]
    assert len(q) == 16 and all(mod.kernel_size == (3, 3) for mod in q)
    assert type(m.conv1) is torch.nn.Conv2d and type(m.fc) is torch.nn.Linear
    assert m.layer2[0].downsample[1].kernel_size == (1, 1)
    n = sum(p.numel() for p in m.parameters())
    assert 11.0e6 < n < 11.8e6  # ResNet-18 scale


def _torchvision_like_state(model):
    """What torchvision's resnet18 state dict looks like, from our own model:
    downsample.{0: 1x1 conv, 1: BN} instead of {1: conv, 2: BN}."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace(".downsample.1.", ".downsample.0.").replace(
            ".downsample.2.", ".downsample.1."
        )
        out[k] = torch.randn_like(v) if v.is_floating_point() else v
    return out


def test_load_torchvision_weights_from_file(tmp_path):
    src = resnet18(1000, stem="imagenet", width=0.25)
    state = _torchvision_like_state(src)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    dst = resnet18(1000, stem="imagenet", width=0.25)
    skipped = load_torchvision_weights(dst, path)
    assert skipped == []
    assert torch.equal(dst.layer2[0].downsample[1].weight, state["layer2.0.downsample.0.weight"])
    assert torch.equal(dst.layer1[1].conv2.weight, state["layer1.1.conv2.weight"])
    # another class count and stem: those tensors are skipped and reported
    other = resnet18(10, stem="cifar", width=0.25)
    skipped = load_torchvision_weights(other, path)
    assert "fc.weight" in skipped and "conv1.weight" in skipped


def test_load_torchvision_weights_rejects_other_files(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"something": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_torchvision_weights(resnet18(10), path)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"stem": "tiny"}, "stem"),
        ({"block": "x"}, "block"),
        ({"width": 0}, "width"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_resnet18_bad_arguments(kwargs, words):
    kwargs.setdefault("num_classes", 10)
    with pytest.raises(ValueError, match=words):
        resnet18(**kwargs)
