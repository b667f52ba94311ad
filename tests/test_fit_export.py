"""The Python API on a user's own model: ctmq.nn.convert -> ctmq.engine.fit
(CTMQ schedule, checkpoints, resume) -> ctmq.export -> ctmq.deploy with the
model's own predictions; and the exporter's lowering and its errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctmq import data, deploy
from ctmq.engine import Schedule, TrainConfig, fit, load_checkpoint, make_loaders
from ctmq.engine.trainer import DistInfo
from ctmq.export import ExportError, export_binary
from ctmq.nn import QConv2d, RPReLU, RSign, convert, quantized_layers, set_bits


class SmallNet(nn.Module):
    """A user-style CNN: a concat of two branches, odd channel counts, a
    residual sum, max pool, ReLU and dropout."""

    def __init__(self, in_channels=1, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 24, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(24)
        self.a = nn.Conv2d(24, 21, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(21)
        self.b = nn.Conv2d(24, 19, 1)
        self.bnb = nn.BatchNorm2d(19)
        self.c = nn.Conv2d(40, 40, 3, padding=1, bias=False)
        self.bnc = nn.BatchNorm2d(40)
        self.d = nn.Conv2d(40, 33, 3, stride=2, padding=1, bias=False)
        self.bnd = nn.BatchNorm2d(33)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(33 * 2 * 2, classes)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        y = torch.cat([F.hardtanh(self.bna(self.a(x))), self.bnb(self.b(x))], dim=1)
        y = self.bnc(self.c(y)) + y
        y = self.pool(F.relu(self.bnd(self.d(F.hardtanh(y)))))
        return self.fc(self.drop(torch.flatten(y, 1)))


def _user_model(seed=0):
    torch.manual_seed(seed)
    return convert(SmallNet())


def _digits_loaders(batch_size=128):
    d = data.load("digits")
    return d, make_loaders(d, batch_size, DistInfo(), seed=0)


def test_a_converted_user_model_trains_with_ctmq_exports_and_deploys(tmp_path):
    model = _user_model()
    assert [type(m) for m in quantized_layers(model)] == [QConv2d] * 4  # stem and fc stay FP
    d, (train, test) = _digits_loaders()
    sched = Schedule.ctmq(start_bits=2, target_bits=1, cycles=2, epochs_per_stage=1)
    cfg = TrainConfig(lr=5e-3, progress=False)
    out = str(tmp_path / "run")
    rep = fit(model, train, test, sched, out, config=cfg, log=lambda *a: None)
    labels = [(r["cycle"], r["label"]) for r in rep["stages"]]
    assert labels == [(1, "FP"), (1, "W2A2"), (1, "W1A1"), (2, "FP"), (2, "W2A2"), (2, "W1A1")]
    assert rep["final"]["ctmq"]["top1"] > 50  # 10 classes: well above chance after 6 epochs
    with open(tmp_path / "run" / "report.json") as f:
        assert json.load(f)["final"] == rep["final"]

    # the last stage's checkpoint rebuilds the model (the model's code is the user's)
    last = tmp_path / "run" / "stages" / (sched.stage_key(len(sched.stages) - 1) + ".safetensors")
    again = _user_model(seed=1)
    _, meta = load_checkpoint(str(last), again)
    assert meta["stage"]["w_bits"] == 1 and all(
        m.w_bits == m.a_bits == 1 for m in quantized_layers(again)
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True)
    )

    # resume: every stage is complete, nothing is trained again
    seen = []
    fit(again, train, test, sched, out, config=cfg, log=seen.append)
    assert sum("skipped" in line for line in seen) == len(sched.stages)

    art = tmp_path / "user.ctmq"
    header = export_binary(model, art, input_size=d.image_size, mean=d.mean, std=d.std)
    ops = [n["op"] for n in header["nodes"]]
    assert ops == [
        "conv2d",
        "batch_norm",
        "binary_conv",
        "hardtanh",
        "binary_conv",
        "concat",
        "binary_conv",
        "binary_conv",
        "relu",
        "max_pool2d",
        "flatten",
        "linear",
        "output",
    ]
    c = header["nodes"][6]
    assert len(c["in"]) == 2 and c["in"][1] == header["nodes"][5]["out"]  # residual fused
    assert header["architecture"] == {"name": "SmallNet"}
    rt = deploy.load(art)
    model.eval()
    x = torch.stack([test.dataset[i][0] for i in range(64)])
    with torch.no_grad():
        want = model(x)
    got = rt(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))
    # the torch-free runtime on the same artifact: the executor's logits to float rounding
    native = deploy.load(art, engine="native", threads=2)(x.numpy())
    np.testing.assert_allclose(native, got.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(native.argmax(1), got.argmax(1).numpy())


def test_fit_refuses_what_it_cannot_train(tmp_path):
    d, (train, test) = _digits_loaders()
    sched = Schedule.direct(1, 1, 0)
    with pytest.raises(ValueError, match="no QConv2d/QLinear layers"):
        fit(SmallNet(), train, test, sched, str(tmp_path / "a"))
    with pytest.raises(TypeError, match="schedules must be"):
        fit(_user_model(), train, test, "ctmq", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="distinct names"):
        fit(_user_model(), train, test, [sched, sched], str(tmp_path / "c"))
    with pytest.raises(TypeError, match="config must be a ctmq.engine.TrainConfig"):
        fit(_user_model(), train, test, sched, str(tmp_path / "d"), config={"lr": 1})


class ReActUnit(nn.Module):
    """RSign -> binary conv -> BN + shortcut -> RPReLU, twice, the second
    binary conv's input thresholded by a second RSign."""

    def __init__(self, c=37):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.move1, self.move2 = RSign(c), RSign(c)
        self.conv1 = QConv2d(c, c, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.conv2 = QConv2d(c, c, 1, bias=True, w_bits=1, a_bits=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.act1, self.act2 = RPReLU(c), nn.PReLU(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.act1(x + self.bn1(self.conv1(self.move1(x))))
        x = self.act2(self.bn2(self.conv2(self.move2(x))) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(
                        torch.randn(t.shape, generator=g) * 0.5
                        + (1 if name.endswith("weight") and t.dim() == 1 else 0)
                    )
    return model


def test_rsign_rprelu_prelu_and_conv_bias_lower_and_deploy(tmp_path):
    model = _randomize(ReActUnit()).eval()
    header = export_binary(model, tmp_path / "r.ctmq", input_size=9)
    ops = [n["op"] for n in header["nodes"]]
    assert ops == [
        "conv2d",
        "batch_norm",
        "binary_conv",
        "rprelu",
        "binary_conv",
        "prelu",
        "global_avg_pool",
        "linear",
        "output",
    ]
    b1, b2 = header["nodes"][2], header["nodes"][4]
    assert b1["input_bias"] == "move1.bias" and b2["input_bias"] == "move2.bias"
    assert len(b1["in"]) == len(b2["in"]) == 2  # both shortcuts fused
    x = torch.randn(4, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(deploy.load(tmp_path / "r.ctmq")(x), want, rtol=1e-4, atol=1e-4)
    # the input bias matters: without it the logits differ
    with torch.no_grad():
        model.move1.bias.add_(0.7)
    assert not torch.allclose(deploy.load(tmp_path / "r.ctmq")(x), model(x), atol=1e-3)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = QConv2d(3, 8, 3, w_bits=1, a_bits=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.sigmoid(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = QConv2d(3, 8, 3, w_bits=1, a_bits=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = QConv2d(8, 8, 3, padding=1, w_bits=1, a_bits=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        y = self.act(x) + self.conv(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_export_errors_name_the_layer_and_the_source_line(tmp_path):
    with pytest.raises(
        ExportError,
        match=r"function sigmoid at .*test_fit_export.py.*line \d+.*"
        r"torch.sigmoid\(self.conv\(x\)\).*vocabulary",
    ):
        export_binary(Unsupported(), tmp_path / "a.ctmq", input_size=8)
    with pytest.raises(ExportError, match="cannot capture Branching's forward"):
        export_binary(Branching(), tmp_path / "b.ctmq", input_size=8)
    with pytest.raises(ExportError, match=r"ReLU layer 'act'.*in place"):
        export_binary(InPlace(), tmp_path / "c.ctmq", input_size=8)
    with pytest.raises(ExportError, match="input_size: give the image side"):
        export_binary(set_bits(_user_model(), 1, 1), tmp_path / "d.ctmq")
    m = convert(SmallNet(), keep_last=False)
    set_bits(m, 1, 1)
    with pytest.raises(ExportError, match=r"QLinear layer 'fc'.*keep the last linear"):
        export_binary(m, tmp_path / "e.ctmq", input_size=8)
    set_bits(m, 2, 2)
    with pytest.raises(ExportError, match=r"not W1A1: a \(W2A2\)"):
        export_binary(m, tmp_path / "f.ctmq", input_size=8)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _random_statistics(model, seed=1):
    """BN statistics and affine parameters, RSign/RPReLU shifts away from their
    initial values, so that the fold and every per-channel term matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            elif isinstance(m, (RSign, RPReLU)):
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


ZOO_CASES = [
    ("resnet18", dict(stem="imagenet", width=0.125), 64),
    ("resnet18", dict(stem="cifar", block="basic", width=0.25), 32),
    ("resnet34", dict(stem="cifar", width=0.125), 32),
    ("resnet34", dict(stem="cifar", block="basic", width=0.125), 32),
    ("vgg_small", dict(width=0.125), 32),
    ("reactnet_a", dict(stem="imagenet", width=0.125), 64),
    ("reactnet_a", dict(stem="cifar", width=0.25, in_channels=1), 16),
]


@pytest.mark.parametrize(
    "name,kwargs,size",
    ZOO_CASES,
    ids=[f"{n}-{'-'.join(str(v) for v in kw.values())}" for n, kw, _ in ZOO_CASES],
)
def test_every_zoo_model_deploys_with_its_own_logits_bit_for_bit(tmp_path, name, kwargs, size):
    from ctmq.models import MODELS

    torch.manual_seed(0)
    model = _random_statistics(set_bits(MODELS[name](10, **kwargs), 1, 1)).eval()
    header = export_binary(model, tmp_path / "m.ctmq", input_size=size)
    assert header["architecture"] == dict(model.config, name=name)
    ops = [n["op"] for n in header["nodes"]]
    assert ops.count("binary_conv") == len(quantized_layers(model))
    x = torch.randn(3, model.config["in_channels"], size, size)
    with torch.no_grad():
        want = model(x)
    got = deploy.load(tmp_path / "m.ctmq")(x)
    assert torch.equal(got, want), (got - want).abs().max()


def test_resnet18_exports_to_the_graph_it_always_had(tmp_path):
    """Node for node: the stem, per Bi-Real block two float binary convs with
    their shortcuts fused, per basic block a packed one, a fused one and a
    hardtanh; downsample shortcuts avg pool, conv, BN; pool, fc, output."""
    from ctmq.models import resnet18

    stem = ["conv2d", "batch_norm", "max_pool2d"]
    short = ["avg_pool2d", "conv2d", "batch_norm"]
    tail = ["global_avg_pool", "linear", "output"]
    for block, unit in (
        ("bireal", ["binary_conv", "binary_conv"]),
        ("basic", ["binary_conv", "binary_conv", "hardtanh"]),
    ):
        model = set_bits(resnet18(10, stem="imagenet", block=block, width=0.125), 1, 1)
        nodes = export_binary(model, tmp_path / f"{block}.ctmq", input_size=64)["nodes"]
        want = stem + unit * 2 + (short + unit + unit) * 3 + tail
        if block == "bireal":  # a shortcut per conv: the downsample one comes first
            want = stem + unit * 2 + (short + unit * 2) * 3 + tail
        assert [n["op"] for n in nodes] == want, block
        convs = [n for n in nodes if n["op"] == "binary_conv"]
        if block == "bireal":
            assert all(len(n["in"]) == 2 and n["output"] == "float" for n in convs)
        else:
            assert [(len(n["in"]), n["output"]) for n in convs] == [(1, "packed"), (2, "float")] * 8


@pytest.mark.parametrize("name", ["resnet34", "vgg_small", "reactnet_a"])
def test_ctmq_train_and_export_take_every_zoo_model(tmp_path, name):
    from ctmq import cli
    from ctmq.cli.deploy import find_checkpoint
    from ctmq.engine import model_from_checkpoint

    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--model",
                name,
                "--width",
                "0.125",
                "--schedule",
                "ctmq",
                "--start-bits",
                "2",
                "--cycles",
                "1",
                "--epochs-per-stage",
                "1",
                "--batch-size",
                "256",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    art = tmp_path / "m.ctmq"
    assert cli.main(["export", str(out), "-o", str(art)]) == 0
    model, _ = model_from_checkpoint(find_checkpoint(str(out))[0])
    d = data.load("digits")
    x = torch.stack([d.test[i][0] for i in range(16)])
    with torch.no_grad():
        want = model.eval()(x)
    assert torch.equal(deploy.load(art)(x), want)


def _check_deploys_as_eval(model, tmp_path, size=8, channels=3, randomize=True):
    model = (_random_statistics(model) if randomize else model).eval()
    export_binary(model, tmp_path / "m.ctmq", input_size=size)
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(deploy.load(tmp_path / "m.ctmq")(x), want, rtol=1e-4, atol=1e-4)


class _Base(nn.Module):
    def __init__(self, c=12, bn_kwargs=None):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv = QConv2d(c, c, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.conv2 = QConv2d(c, c, 1, bias=False, w_bits=1, a_bits=1)
        self.bn = nn.BatchNorm2d(c, **(bn_kwargs or {}))
        self.bn2 = nn.BatchNorm2d(c)
        self.idn = nn.Identity()
        self.fc = nn.Linear(2 * c, 4)

    def head(self, y):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class TwoConvsIntoOneSum(_Base):  # torchvision's BasicBlock after convert: conv + conv shortcut
    def forward(self, x):
        a = self.bn0(self.stem(x))
        out = self.bn(self.conv(a))
        out += self.bn2(self.conv2(a))
        return self.head(torch.cat([out, a], 1))


class SharedConvTwoNorms(_Base):  # one conv module, two calls, each with its own BN
    def forward(self, x):
        a = self.bn0(self.stem(x))
        y = self.bn(self.conv(a))
        return self.head(torch.cat([y, self.bn2(self.conv(F.hardtanh(y)))], 1))


class PlainNorm(_Base):  # a BN without affine parameters after a binary conv
    def __init__(self):
        super().__init__(bn_kwargs={"affine": False})

    def forward(self, x):
        a = self.bn0(self.stem(x))
        return self.head(torch.cat([self.bn(self.conv(a)) + a, a], 1))


@pytest.mark.parametrize("cls", [TwoConvsIntoOneSum, SharedConvTwoNorms, PlainNorm])
def test_shared_convs_two_convs_per_sum_and_plain_norms_deploy_as_eval(tmp_path, cls):
    _check_deploys_as_eval(cls(), tmp_path)


class SumIntoAliasedTensor(_Base):  # `b = a; a += y`: eager b changes too
    def forward(self, x):
        a = self.bn0(self.stem(x))
        b = a
        a += self.bn(self.conv(a))
        return self.head(torch.cat([a, b], 1))


class ReluThroughIdentity(_Base):  # idn(a) is a itself: relu in place changes a
    def forward(self, x):
        a = self.bn0(self.stem(x))
        c = F.relu(self.idn(a), inplace=True)
        return self.head(torch.cat([a, self.bn(self.conv(c))], 1))


class SumReadEarlierOnly(_Base):  # every other reader of a runs before the +=: fine
    def forward(self, x):
        a = self.bn0(self.stem(x))
        s = self.bn2(self.conv2(a))
        a += self.bn(self.conv(a))
        return self.head(torch.cat([a, s], 1))


@pytest.mark.parametrize("cls", [SumIntoAliasedTensor, ReluThroughIdentity])
def test_in_place_ops_on_tensors_read_later_are_refused(tmp_path, cls):
    with pytest.raises(ExportError, match="writes in place into a tensor that .* reads later") as e:
        export_binary(cls(), tmp_path / "m.ctmq", input_size=8)
    where = str(e.value).split(": writes in place")[0]  # the in-place op's own source line
    assert "test_fit_export.py" in where and "ctmq/export/" not in where, where


def test_in_place_sum_whose_operand_is_not_read_later_deploys(tmp_path):
    _check_deploys_as_eval(SumReadEarlierOnly(), tmp_path)


class ChainWithoutNorms(_Base):  # binary convs back to back, no BN: exact zeros matter
    def forward(self, x):
        a = self.bn0(self.stem(x))
        return self.head(torch.cat([self.conv2(self.conv(a)), a], 1))


class FreshNorms(_Base):  # BN at its initial statistics (straight after convert)
    def forward(self, x):
        a = self.bn0(self.stem(x))
        y = self.bn2(self.conv2(F.hardtanh(self.bn(self.conv(a)))))
        return self.head(torch.cat([y, a], 1))


@pytest.mark.parametrize("cls", [ChainWithoutNorms, FreshNorms])
def test_binary_convs_without_a_folded_norm_deploy_as_eval(tmp_path, cls):
    """A QConv2d's own eval at W1A1 is the exact integer conv times its scale,
    so an exact zero stays zero and the next sign agrees with the runtime's."""
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        model.stem.weight.copy_(torch.randint(-1, 2, model.stem.weight.shape).float())
    _check_deploys_as_eval(model, tmp_path, size=9, randomize=cls is ChainWithoutNorms)
