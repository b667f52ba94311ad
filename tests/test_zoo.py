"""The model zoo (ctmq.models.MODELS): training at every bit depth, rebuilding
from config, ReActNet-A against the official code's structure, torchvision
ResNet-34 names, the VGG-Small layout, fx tracing."""

import json

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ctmq.models import MODELS, load_torchvision_weights, reactnet_a, resnet18, resnet34, vgg_small
from ctmq.nn import QConv2d, QLinear, RPReLU, RSign, set_bits

LADDER = [(32, 32), (4, 4), (3, 3), (2, 2), (1, 1)]
# small instances: (builder arguments, input side)
ZOO = {
    "resnet18": (dict(stem="cifar", block="bireal", width=0.125), 8),
    "resnet34": (dict(stem="cifar", block="basic", width=0.125), 8),
    "vgg_small": (dict(width=0.125), 16),
    "reactnet_a": (dict(stem="cifar", width=0.125), 16),
}


def _build(name, num_classes=10):
    kwargs, size = ZOO[name]
    return MODELS[name](num_classes, **kwargs), torch.randn(4, 3, size, size)


def _first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_registry_holds_the_zoo():
    assert set(MODELS) == {"resnet18", "resnet34", "vgg_small", "reactnet_a"}


@pytest.mark.parametrize("name", ZOO)
def test_one_step_at_every_depth(name):
    model, x = _build(name)
    y = torch.randint(0, 10, (x.shape[0],))
    first = _first_conv(model)
    assert type(first) is nn.Conv2d and type(model.fc) is nn.Linear  # FP first conv and FC
    qconvs = [m for m in model.modules() if isinstance(m, QConv2d)]
    assert qconvs
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for w, a in LADDER:
        set_bits(model, w, a)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss), (w, a)
        loss.backward()
        for conv in [first] + qconvs:
            g = conv.weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (w, a, conv)
        before = first.weight.detach().clone()
        opt.step()
        assert not torch.equal(before, first.weight)


@pytest.mark.parametrize("name", ZOO)
def test_config_rebuilds_the_model(name):
    model, x = _build(name)
    config = json.loads(json.dumps(model.config))  # JSON-able, as checkpoint metadata stores it
    again = MODELS[name](**config)
    assert type(again) is type(model) and again.config == model.config
    again.load_state_dict(model.state_dict(), strict=True)
    for m in (model, again):
        set_bits(m, 1, 1)
        m.eval()
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("name", ZOO)
def test_engine_call_form(name):
    kwargs, size = ZOO[name]
    block = kwargs.get("block")
    stem = kwargs.get("stem", "cifar")
    model = MODELS[name](7, stem=stem, block=block, width=0.125, in_channels=1)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


@pytest.mark.parametrize("build", [vgg_small, reactnet_a])
def test_models_without_block_choice_refuse_one(build):
    with pytest.raises(ValueError, match="block"):
        build(10, block="bireal")


@pytest.mark.parametrize(
    "kwargs,words",
    [({"stem": "imagenet"}, "stem"), ({"width": 0}, "width"), ({"num_classes": 0}, "num_classes")],
)
def test_vgg_small_bad_arguments(kwargs, words):
    kwargs.setdefault("num_classes", 10)
    with pytest.raises(ValueError, match=words):
        vgg_small(**kwargs)


def test_resnet_depth_is_checked():
    assert resnet34(10, width=0.125).config["depth"] == 34
    assert resnet18(10, width=0.125).config["depth"] == 18
    with pytest.raises(ValueError, match="depth"):
        resnet34(10, width=0.125, depth=18)
    with pytest.raises(ValueError, match="depth"):
        resnet18(10, width=0.125, depth=34)
    # a resnet18 config without a depth key rebuilds (depth defaults to 18)
    old = dict(num_classes=10, stem="cifar", block="basic", width=0.125, in_channels=3)
    assert MODELS["resnet18"](**old).config["depth"] == 18


def test_resnet34_structure():
    m = resnet34(1000, block="basic")
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert sum(isinstance(mod, QConv2d) for mod in m.modules()) == 32
    n = sum(p.numel() for p in m.parameters())
    assert 21.5e6 < n < 22.0e6  # ResNet-34 scale (torchvision: 21.8M)


# --------------------------------------------------------- torchvision names
def _torchvision_resnet34_shapes(num_classes=1000):
    """torchvision's resnet34 state dict: key -> shape, from its known layout."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{s}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for li, (c, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True), 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            bn(f"{p}.bn1", c)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if b == 0 and li > 1:
                shapes[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                bn(f"{p}.downsample.1", c)
        cin = c
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


@pytest.mark.parametrize("block", ["basic", "bireal"])
def test_resnet34_loads_torchvision_names(block):
    shapes = _torchvision_resnet34_shapes()
    n_params = sum(
        torch.Size(s).numel()
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n_params == 21_797_672  # torchvision's resnet34 parameter count
    state = {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s)
        for k, s in shapes.items()
    }
    model = resnet34(1000, stem="imagenet", block=block)
    assert load_torchvision_weights(model, state) == []
    ours = model.state_dict()
    assert len(ours) == len(state)
    for k, v in state.items():
        k = k.replace(".downsample.1.", ".downsample.2.")
        k = k.replace(".downsample.0.", ".downsample.1.")
        assert torch.equal(ours[k], v), k


# ---------------------------------------------------------------- VGG-Small
def test_vgg_small_literature_channels():
    m = vgg_small()
    convs = [getattr(m, f"conv{i}") for i in range(6)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert [c.in_channels for c in convs] == [3, 128, 128, 256, 256, 512]
    assert type(convs[0]) is nn.Conv2d and all(type(c) is QConv2d for c in convs[1:])
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert m.fc.in_features == 512 * 4 * 4 and m.fc.out_features == 10


def test_vgg_small_layout():
    m = vgg_small(10, width=0.25)
    assert [getattr(m, f"conv{i}").out_channels for i in range(6)] == [32, 32, 64, 64, 128, 128]
    pooled, resampled = [], []
    m.pooling.register_forward_hook(lambda mod, i, o: pooled.append(tuple(o.shape[1:])))
    m.avgpool.register_forward_hook(lambda mod, i, o: resampled.append(torch.equal(i[0], o)))
    bn_seen = []
    for i in range(6):
        getattr(m, f"bn{i}").register_forward_hook(lambda mod, i, o: bn_seen.append(o.shape[-1]))
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    assert pooled == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]  # after conv1, conv3, conv5
    assert bn_seen == [32, 32, 16, 16, 8, 8]  # BN before the pool
    assert resampled == [True]  # the 4x4 adaptive pool is the identity at 32x32 input
    assert vgg_small(10, width=0.25, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# ------------------------------------------------ ReActNet-A vs the official code
class _LearnableBias(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return x + self.bias.expand_as(x)


class _HardBinaryConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.stride, self.padding, self.shape = stride, padding, (cout, cin, k, k)
        self.weights = nn.Parameter(torch.rand(cout * cin * k * k, 1) * 0.001)

    def forward(self, x):
        w = self.weights.view(self.shape)
        a = w.abs()
        scale = a.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
        return F.conv2d(x, scale * torch.sign(w), stride=self.stride, padding=self.padding)


class _RefBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.inplanes, self.planes, self.stride = inplanes, planes, stride
        self.move11 = _LearnableBias(inplanes)
        self.binary_3x3 = _HardBinaryConv(inplanes, inplanes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.move12 = _LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.move13 = _LearnableBias(inplanes)
        self.move21 = _LearnableBias(inplanes)
        if inplanes == planes:
            self.binary_pw = _HardBinaryConv(inplanes, planes, 1)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.binary_pw_down1 = _HardBinaryConv(inplanes, inplanes, 1)
            self.binary_pw_down2 = _HardBinaryConv(inplanes, inplanes, 1)
            self.bn2_1 = nn.BatchNorm2d(inplanes)
            self.bn2_2 = nn.BatchNorm2d(inplanes)
        self.move22 = _LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.move23 = _LearnableBias(planes)
        if inplanes != planes:
            self.pooling = nn.AvgPool2d(2, 2)

    def forward(self, x):
        out1 = self.bn1(self.binary_3x3(torch.sign(self.move11(x))))
        if self.stride == 2:
            x = self.pooling(x)
        out1 = self.move13(self.prelu1(self.move12(x + out1)))
        out2 = torch.sign(self.move21(out1))
        if self.inplanes == self.planes:
            out2 = self.bn2(self.binary_pw(out2)) + out1
        else:
            out2 = torch.cat(
                [
                    self.bn2_1(self.binary_pw_down1(out2)) + out1,
                    self.bn2_2(self.binary_pw_down2(out2)) + out1,
                ],
                dim=1,
            )
        return self.move23(self.prelu2(self.move22(out2)))


_OFFICIAL_CHANNELS = [32] + [64] + [128] * 2 + [256] * 2 + [512] * 6 + [1024] * 2


class _RefReActNet(nn.Module):
    """The official reactnet, its channel list divided by `div`."""

    def __init__(self, div, first_stride, num_classes):
        super().__init__()
        c = _OFFICIAL_CHANNELS
        layers = [
            nn.Sequential(
                nn.Conv2d(3, c[0] // div, 3, first_stride, 1, bias=False),
                nn.BatchNorm2d(c[0] // div),
            )
        ]
        for i in range(1, len(c)):
            stride = 2 if c[i - 1] != c[i] and c[i] != 64 else 1
            layers.append(_RefBlock(c[i - 1] // div, c[i] // div, stride))
        self.feature = nn.Sequential(*layers)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c[-1] // div, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool1(self.feature(x)), 1))


_RPRELU = {"shift_in": "move{}2.bias", "weight": "prelu{}.weight", "shift_out": "move{}3.bias"}


def _official_key(key):
    """Our reactnet_a state-dict key -> the official code's."""
    parts = key.split(".")
    if parts[-2] in ("prelu1", "prelu2"):
        return ".".join(parts[:-2] + [_RPRELU[parts[-1]].format(parts[-2][-1])])
    if parts[-2].startswith("binary_"):
        return key[: -len("weight")] + "weights"
    return key


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(mod, RSign):
                mod.bias.normal_(0, 0.2, generator=g)
            elif isinstance(mod, RPReLU):
                mod.shift_in.normal_(0, 0.2, generator=g)
                mod.weight.uniform_(0.0, 0.5, generator=g)
                mod.shift_out.normal_(0, 0.2, generator=g)


@pytest.mark.parametrize("stem,size", [("imagenet", 32), ("cifar", 16)])
def test_reactnet_a_matches_official_structure(stem, size):
    ours = reactnet_a(10, stem=stem, width=0.125)
    _randomize(ours)
    set_bits(ours, 1, 1)
    ref = _RefReActNet(8, 2 if stem == "imagenet" else 1, 10)
    want = ref.state_dict()
    mapped = {_official_key(k): v for k, v in ours.state_dict().items()}
    ref.load_state_dict({k: v.reshape(want[k].shape) for k, v in mapped.items()}, strict=True)
    x = torch.randn(8, 3, size, size)
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        with torch.no_grad():
            got, expected = ours(x), ref(x)
        tol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=tol)
        assert expected.std() > 0


def test_rsign_rprelu():
    x = torch.randn(2, 3, 4, 4)
    s, p = RSign(3), RPReLU(3)
    assert s.bias.shape == (3,) and torch.equal(s(x), x)
    assert torch.equal(p.weight, torch.full((3,), 0.25))
    with torch.no_grad():
        s.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        p.shift_in.copy_(torch.tensor([0.1, 0.2, 0.3]))
        p.shift_out.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(s(x), x + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    v = x + p.shift_in.view(1, 3, 1, 1)
    expected = torch.where(v >= 0, v, 0.25 * v) + p.shift_out.view(1, 3, 1, 1)
    torch.testing.assert_close(p(x), expected)


# ------------------------------------------------------------ eval, tracing
@pytest.mark.parametrize("name", ZOO)
def test_eval_w1a1_deterministic_and_finite(name):
    model, x = _build(name)
    model(x)  # one training-mode pass: running statistics that are not the defaults
    set_bits(model, 1, 1)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # the input reaches the logits


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        leaf = isinstance(m, (QConv2d, QLinear, RSign, RPReLU))
        return leaf or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", ZOO)
def test_fx_traceable_conv_then_bn(name):
    model, x = _build(name)
    set_bits(model, 1, 1)
    graph = _LeafTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    mods = dict(model.named_modules())
    qnodes = [
        n for n in graph.nodes if n.op == "call_module" and isinstance(mods[n.target], QConv2d)
    ]
    assert len(qnodes) == sum(isinstance(m, QConv2d) for m in model.modules())
    for n in qnodes:  # each quantized conv feeds exactly one BN, the pair the exporter folds
        (user,) = n.users
        assert user.op == "call_module" and isinstance(mods[user.target], nn.BatchNorm2d), n.target
    model.train()
    torch.testing.assert_close(gm(x), model(x))
