"""The compiled CPU executor (ctmq._C.Executor, csrc/runtime) gives the logits
of the node-by-node runtime bit for bit, on every zoo model, a user's model,
every CPU path, batch size and thread count; it knows every op of the
vocabulary; it plans few buffers and few layout conversions."""

import json

import pytest
import torch
from model_helpers import randomized
from torch import nn

import ctmq
from ctmq import deploy, ops
from ctmq.artifact import OPS
from ctmq.export import export_binary
from ctmq.models import MODELS
from ctmq.nn import QConv2d, RPReLU, RSign, set_bits

pytestmark = pytest.mark.skipif(not ctmq.has_extension(), reason="ctmq._C not built")

PATHS = ["auto", "avx2", "scalar"] if ops.binary_cpu_path("") != "neon" else ["auto", "scalar"]


ZOO = [
    ("resnet18", dict(stem="imagenet", width=0.25), 64),
    ("resnet18", dict(stem="cifar", block="basic", width=0.25), 16),
    ("resnet34", dict(stem="cifar", width=0.125), 16),
    ("vgg_small", dict(width=0.125), 32),
    ("reactnet_a", dict(stem="imagenet", width=0.125), 64),
    ("reactnet_a", dict(stem="cifar", width=0.25, in_channels=1), 16),
]


@pytest.fixture(scope="module")
def zoo_artifacts(tmp_path_factory):
    out = {}
    for i, (name, kwargs, size) in enumerate(ZOO):
        torch.manual_seed(i)
        model = randomized(set_bits(MODELS[name](10, **kwargs), 1, 1))
        path = tmp_path_factory.mktemp("zoo") / f"{name}-{i}.ctmq"
        export_binary(model, path, input_size=size)
        out[i] = (model, path, size, kwargs.get("in_channels", 3))
    return out


def _engines(path):
    return deploy.load(path, engine="executor"), deploy.load(path, engine="python")


@pytest.mark.parametrize(
    "case", range(len(ZOO)), ids=[f"{n}-{k.get('stem', '')}" for n, k, _ in ZOO]
)
def test_executor_equals_the_model_and_the_node_by_node_runtime(zoo_artifacts, case):
    model, path, size, ch = zoo_artifacts[case]
    fast, slow = _engines(path)
    assert fast.executor is not None and slow.executor is None
    for n in (1, 3):
        x = torch.randn(n, ch, size, size, generator=torch.Generator().manual_seed(n))
        want = slow(x)
        assert torch.equal(fast(x), want)
        with torch.no_grad():
            assert torch.equal(model(x), want)  # the zoo's eval path is the runtime's


@pytest.mark.parametrize("path_name", PATHS)
def test_executor_on_every_cpu_path_and_thread_count(zoo_artifacts, path_name):
    _, path, size, ch = zoo_artifacts[0]
    fast, slow = _engines(path)
    x = torch.randn(5, ch, size, size)
    threads = torch.get_num_threads()
    try:
        ops.binary_cpu_path(path_name)
        for t in (1, 2):  # (oneDNN's float convs round by thread count: both engines alike)
            torch.set_num_threads(t)
            assert torch.equal(fast(x), slow(x)), (path_name, t)
    finally:
        ops.binary_cpu_path("auto")
        torch.set_num_threads(threads)


class UserNet(nn.Module):
    """RSign into binary convs, a packed chain, RPReLU, concat, a 1x1 binary conv,
    max and average pools, a flatten of a 2x2 map, odd channel counts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 37, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(37)
        self.sign = RSign(37)
        self.a = QConv2d(37, 37, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.bna = nn.BatchNorm2d(37)
        self.b = QConv2d(37, 21, 1, bias=False, w_bits=1, a_bits=1)
        self.bnb = nn.BatchNorm2d(21)
        self.act = RPReLU(37)
        self.c = QConv2d(58, 40, 3, stride=2, padding=1, bias=False, w_bits=1, a_bits=1)
        self.bnc = nn.BatchNorm2d(40)
        self.pool = nn.AvgPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(40 * 2 * 2, 6)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.bn0(self.stem(x)), 2)
        y = self.act(self.bna(self.a(self.sign(x))) + x)
        z = torch.cat([y, self.bnb(self.b(self.sign(x)))], 1)
        z = self.pool(self.bnc(self.c(nn.functional.hardtanh(z))))
        return self.fc(torch.flatten(z, 1))


def test_executor_on_a_users_model(tmp_path):
    torch.manual_seed(0)
    model = randomized(UserNet())
    export_binary(model, tmp_path / "m.ctmq", input_size=14)
    fast, slow = _engines(tmp_path / "m.ctmq")
    x = torch.randn(4, 3, 14, 14)
    assert torch.equal(fast(x), slow(x))


def test_the_executor_knows_every_op_of_the_vocabulary():
    from ctmq import _C

    assert set(_C.executor_ops()) == set(OPS)


def test_plan_resnet18_layouts_signs_and_buffers(zoo_artifacts):
    """ResNet-18 (ImageNet stem, Bi-Real blocks): the layout changes only where
    the trained model's float ops run in NCHW (the stem conv's output to NHWC;
    each of the 3 downsample shortcuts to NCHW for its 1x1 conv and back; the
    last map to NCHW for the global pool); every binary conv but the first
    reads signs written by the one before, no pack step else; the arena is a
    fraction of all values together."""
    _, path, _, _ = zoo_artifacts[0]
    rt = deploy.load(path, engine="executor")
    plan = rt.executor.describe().splitlines()
    assert rt.executor.layout_conversions == 1 + 3 * 2 + 1
    assert sum(line.startswith("pack ") for line in plan) == 1  # the stem's output
    convs = [line for line in plan if line.startswith("binary_conv ")]
    assert len(convs) == 16 and sum("+signs" in line for line in convs) == 15
    # width 0.25 at 64x64: layer1 maps are 16 channels x 16 x 16; the arena holds
    # a few of them at a time, where keeping every value would take about 80
    layer1_map = 8 * 4 * 16 * 16 * 16
    assert rt.executor.arena_bytes(8) < 12 * layer1_map


def test_profile_names_where_the_time_goes(zoo_artifacts):
    _, path, size, ch = zoo_artifacts[0]
    rt = deploy.load(path, engine="executor")
    logits, seconds = rt.profile(torch.randn(2, ch, size, size))
    assert logits.shape == (2, 10)
    assert {"binary_conv", "conv2d", "max_pool2d", "pack", "to_nchw", "linear"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
    _, steps = rt.profile(torch.randn(2, ch, size, size), per_node=True)
    op_of = {n["out"]: n["op"] for n in rt.header["nodes"]}
    run = [name for name, op, _ in steps if op_of.get(name) == op]  # the nodes' own steps
    assert run == [n for n in op_of if n in run]  # in the graph's order
    assert {n for n, op in op_of.items() if op in ("binary_conv", "conv2d", "linear")} <= set(run)
    assert {op for _, op, _ in steps} == set(seconds)
    assert all(s >= 0 for _, _, s in steps)


def test_executor_refuses_what_load_refuses(zoo_artifacts):
    from ctmq import _C

    _, path, _, _ = zoo_artifacts[0]
    header, tensors = deploy.read_artifact(path)
    bad = json.loads(json.dumps(header))
    next(n for n in bad["nodes"] if n["op"] == "binary_conv")["in_channels"] = 999
    with pytest.raises(ValueError, match="binary_conv node .*in_channels"):
        _C.Executor(json.dumps(bad), tensors)
