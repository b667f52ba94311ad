"""ctmq.nn: drop-in quantized layers, set_bits, convert."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ctmq
from ctmq.nn import QConv2d, QLinear, convert, get_bits, quantized_layers, set_bits


def test_qconv_at_32_bits_is_conv2d():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    q = QConv2d(5, 7, 3, stride=2, padding=1)
    q.load_state_dict(conv.state_dict())
    x = torch.randn(2, 5, 9, 9)
    assert torch.equal(q(x), conv(x))


@pytest.mark.parametrize("w_bits,a_bits", [(1, 1), (2, 4), (4, 32), (32, 1)])
def test_qconv_forward_is_quantized_conv(w_bits, a_bits):
    q = QConv2d(4, 6, 3, padding=1, bias=False, w_bits=w_bits, a_bits=a_bits)
    x = torch.randn(2, 4, 7, 7)
    ref = F.conv2d(ctmq.quantize_act(x, a_bits), ctmq.quantize_weight(q.weight, w_bits), padding=1)
    assert torch.equal(q(x), ref)


def test_set_bits_changes_forward_and_linear():
    model = nn.Sequential(QConv2d(3, 8, 3, padding=1), nn.Flatten(), QLinear(8 * 25, 4))
    x = torch.randn(2, 3, 5, 5)
    fp = model(x)
    set_bits(model, 1, 1)
    assert get_bits(model) == (1, 1)
    binary = model(x)
    assert not torch.allclose(fp, binary)
    lin = model[2]
    h = model[1](model[0](x))
    assert torch.equal(
        binary,
        F.linear(
            ctmq.quantize_act(h, 1, "approx_sign"), ctmq.quantize_weight(lin.weight, 1), lin.bias
        ),
    )
    set_bits(model, 32, 32)
    assert torch.equal(model(x), fp)


def test_convert_keeps_first_and_last_fp_and_copies_weights():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.Linear(8, 2),
    )
    x = torch.randn(1, 3, 5, 5)
    before = model(x)
    convert(model, w_bits=32, a_bits=32)
    assert type(model[0]) is nn.Conv2d and type(model[5]) is nn.Linear
    assert isinstance(model[2], QConv2d) and isinstance(model[4], QLinear)
    assert model[2].bias is None and model[4].bias is not None  # as the layers they replace
    assert torch.equal(model(x), before)
    assert len(quantized_layers(model)) == 2
    set_bits(model, 2, 2)
    assert not torch.equal(model(x), before)


def test_bad_bits_and_empty_models():
    with pytest.raises(ValueError, match="w_bits"):
        QConv2d(1, 1, 1, w_bits=0)
    with pytest.raises(ValueError, match="a_bits"):
        set_bits(nn.Sequential(QLinear(2, 2)), 1, 9)
    with pytest.raises(ValueError, match="no QConv2d"):
        set_bits(nn.Sequential(nn.Linear(2, 2)), 1, 1)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        convert(nn.Sequential(nn.ReLU()))
    mixed = nn.Sequential(QLinear(2, 2, w_bits=1, a_bits=1), QLinear(2, 2))
    with pytest.raises(ValueError, match="depths"):
        get_bits(mixed)


@pytest.mark.slow
def test_a_compiled_model_follows_set_bits():
    """torch.compile guards on the layers' bit depths: after set_bits the
    compiled model computes the new depths (it recompiles), as the trainer's
    --compile relies on from stage to stage."""
    torch.manual_seed(0)
    model = convert(
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.Hardtanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )
    )
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 8, 8)
    outputs = []
    for bits in (32, 2, 1):
        set_bits(model, bits, bits)
        outputs.append(compiled(x))
        torch.testing.assert_close(outputs[-1], model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-3)  # the depths differ
