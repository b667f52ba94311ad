"""The op vocabulary is one table: every op has its export function and its
runtime function, nothing else does, and the docs show the table itself;
the exporter takes the functional forms people write; load bounds every
size before allocating; export checks what load checks."""

import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctmq import deploy
from ctmq.artifact import OPS, ArtifactError, read_artifact, write_artifact
from ctmq.artifact.vocabulary import markdown_table
from ctmq.deploy.ops import LOWER
from ctmq.export import ExportError, export_binary
from ctmq.export.lower import EXPORT_OPS, FUNCTION_RULES, METHOD_RULES, MODULE_RULES
from ctmq.nn import QConv2d

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_op_has_its_export_and_runtime_functions_and_nothing_else():
    assert set(LOWER) == set(OPS), set(LOWER) ^ set(OPS)
    assert EXPORT_OPS == set(OPS), EXPORT_OPS ^ set(OPS)
    assert MODULE_RULES and FUNCTION_RULES and METHOD_RULES


def test_the_docs_hold_the_table():
    design = (ROOT / "docs" / "design.md").read_text()
    assert markdown_table() in design, (
        "docs/design.md: paste ctmq.artifact.vocabulary.markdown_table()"
    )


def _quiet_bn(m):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


class Functional(nn.Module):
    """The functional forms: F.max_pool2d, torch.max_pool2d, F.avg_pool2d,
    F.relu6, F.leaky_relu, nn.LeakyReLU, nn.ReLU6, x.view(x.size(0), -1)."""

    def __init__(self, flat="view", shift=0.0):
        super().__init__()
        self.flat, self.shift = flat, shift
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.q = QConv2d(16, 16, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.bn = nn.BatchNorm2d(16)
        self.leaky = nn.LeakyReLU(0.2)
        self.relu6 = nn.ReLU6()
        self.fc = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x):
        x = F.max_pool2d(self.bn0(self.stem(x)), 3, 2, 1)  # 16 -> 8
        x = self.bn(self.q(x)) + x
        x = F.leaky_relu(self.leaky(x), negative_slope=0.05)
        if self.shift:
            x = x - self.shift  # a constant: refused
        x = torch.max_pool2d(F.relu6(self.relu6(x)), 2)  # -> 4
        x = F.avg_pool2d(x, 2)  # -> 2
        if self.flat == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.fc(x)


@pytest.mark.parametrize("flat", ["view", "reshape"])
def test_functional_forms_export_and_deploy_as_eval(tmp_path, flat):
    torch.manual_seed(0)
    with pytest.raises(
        ExportError,
        match=r"function sub at .*test_vocabulary.py.* not in the "
        r"runtime's vocabulary \(nn.Conv2d, ",
    ):
        export_binary(_quiet_bn(Functional(flat, shift=1.0)), tmp_path / "m.ctmq", input_size=16)
    model = _quiet_bn(Functional(flat))
    header = export_binary(model, tmp_path / "m.ctmq", input_size=16)
    ops = [n["op"] for n in header["nodes"]]
    assert ops.count("max_pool2d") == 2 and "avg_pool2d" in ops and ops.count("leaky_relu") == 2
    assert ops.count("hardtanh") == 2 and "flatten" in ops and header["version"] == 3
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    # the model's QConv2d and BatchNorm2d round apart, the runtime's fold at once
    torch.testing.assert_close(deploy.load(tmp_path / "m.ctmq")(x), want, rtol=1e-4, atol=1e-4)


class Refused(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q = QConv2d(8, 8, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=kind != "bn_stats")
        self.pool = nn.MaxPool2d(2, ceil_mode=kind == "ceil")
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        x = self.bn(self.q(self.stem(x)))
        if self.kind == "batch_cat":
            x = torch.cat([x, x], dim=0)
        if self.kind == "view_other":
            return self.fc(self.pool(x).view(-1, 8 * 16))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize(
    "kind,words",
    [
        ("batch_cat", "only concatenation of 2\\+ tensors along channels"),
        ("ceil", "max pool with indices, ceil_mode or dilation"),
        ("bn_stats", "BatchNorm without running statistics"),
        ("view_other", r"only x.view\(x.size\(0\), -1\) runs"),
    ],
)
def test_what_the_runtime_cannot_run_is_refused(tmp_path, kind, words):
    with pytest.raises(ExportError, match=words):
        export_binary(Refused(kind).eval(), tmp_path / "m.ctmq", input_size=8)
    assert not (tmp_path / "m.ctmq").exists()


class ShiftedClamp(nn.Module):
    """A hardtanh that does not keep the sign (to [0.5, 2]) before a binary conv:
    it must run, not vanish as a [-1, 1] one does."""

    def __init__(self, low, high):
        super().__init__()
        self.low, self.high = low, high
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q = QConv2d(8, 8, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.q(F.hardtanh(self.stem(x), self.low, self.high))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("low,high,kept", [(0.5, 2.0, True), (-1.0, 1.0, False)])
def test_a_hardtanh_that_changes_signs_runs(tmp_path, low, high, kept):
    torch.manual_seed(0)
    model = ShiftedClamp(low, high).eval()
    header = export_binary(model, tmp_path / "m.ctmq", input_size=6)
    assert ("hardtanh" in [n["op"] for n in header["nodes"]]) == kept
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(deploy.load(tmp_path / "m.ctmq")(x), want, rtol=1e-5, atol=1e-5)


def test_export_checks_what_load_checks(tmp_path):
    model = _quiet_bn(Functional())
    for kwargs, words in (
        (dict(std=[1.0, 0.0, 1.0]), "one nonzero std"),
        (dict(mean=[0.0, float("nan"), 0.0]), "finite numbers"),
        (dict(mean=[0.0, 0.0]), "mean needs 3 values"),
        (dict(std=["a", 1, 1]), "std must be 3 numbers"),
        (dict(class_names=["a"] * 4), "4 names for 5 classes"),
    ):
        with pytest.raises(ExportError, match=words):
            export_binary(model, tmp_path / "m.ctmq", input_size=16, **kwargs)
        assert not (tmp_path / "m.ctmq").exists()


def _small_artifact(tmp_path):
    export_binary(_quiet_bn(Functional()), tmp_path / "m.ctmq", input_size=16)
    return read_artifact(tmp_path / "m.ctmq")


def test_load_bounds_every_size_before_allocating(tmp_path, monkeypatch):
    header, tensors = _small_artifact(tmp_path)
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a) or real_zeros(*a, **k))
    for edit, words in (
        (lambda h: h["input"].update(size=100000), r"size \(1..16384\)"),
        (
            lambda h: h["input"].update(
                channels=3000, mean=[0.0] * 3000, std=[1.0] * 3000, size=16000
            ),
            "not a plausible image size",
        ),
        (lambda h: h["nodes"][0].update(padding=[8000, 8000]), "not a plausible size"),
        (lambda h: h.update(class_names=["x"] * 6), "expected 6 logits"),
    ):
        h = {**header, "input": dict(header["input"]), "nodes": [dict(n) for n in header["nodes"]]}
        edit(h)
        with pytest.raises(ArtifactError, match=words):
            deploy.Runtime(h, tensors)
        assert not allocated


def test_the_checksum_covers_header_and_every_tensor(tmp_path):
    header, tensors = _small_artifact(tmp_path)
    path = tmp_path / "m.ctmq"
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    # one byte of the JSON header's node list, then one byte inside each tensor's data
    positions = [8 + blob[8 : 8 + n].index(b"max_pool2d") + 1]
    import json

    meta = json.loads(blob[8 : 8 + n])
    positions += [
        8 + n + info["data_offsets"][0]
        for k, info in meta.items()
        if k != "__metadata__" and info["data_offsets"][1] > info["data_offsets"][0]
    ]
    assert len(positions) == len(tensors) + 1
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        (tmp_path / "bad.ctmq").write_bytes(bytes(bad))
        with pytest.raises(ArtifactError, match="checksum mismatch|unknown layer type|corrupt"):
            read_artifact(tmp_path / "bad.ctmq")


def test_writing_an_artifact_replaces_the_file_whole(tmp_path):
    """A new artifact is written beside and renamed over the old one: a reader
    holding the old file (here a hard link) never sees a half-written file."""
    header, tensors = _small_artifact(tmp_path)
    path, link = tmp_path / "m.ctmq", tmp_path / "old.ctmq"
    os.link(path, link)
    before = link.read_bytes()
    write_artifact(path, dict(header, class_names=[f"c{i}" for i in range(5)]), tensors)
    assert link.read_bytes() == before and path.read_bytes() != before
    assert read_artifact(path)[0]["class_names"][0] == "c0"
    assert not list(tmp_path.glob("*.tmp"))


def test_the_native_loaders_table_is_generated_from_this_one():
    from ctmq.artifact.vocabulary import cpp_table

    inc = (ROOT / "csrc" / "runtime" / "vocabulary.inc").read_text()
    assert inc == cpp_table(), (
        "regenerate: python -m ctmq.artifact.vocabulary > csrc/runtime/vocabulary.inc"
    )


class OnePixel(nn.Module):
    """Layers that run on a 1x1 image."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q = QConv2d(8, 8, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.q(self.stem(x)), 1))


def test_input_size_default_and_bounds(tmp_path):
    from ctmq.models import resnet18
    from ctmq.nn import set_bits

    for stem, side in (("cifar", 32), ("imagenet", 224)):
        m = set_bits(resnet18(10, stem=stem, width=0.125), 1, 1).eval()
        assert export_binary(m, tmp_path / f"{stem}.ctmq")["input"]["size"] == side
    model = OnePixel().eval()
    for bad in (0, -3, True, 1.5, "8"):
        with pytest.raises(ExportError, match=f"input_size must be a positive int, got {bad!r}"):
            export_binary(model, tmp_path / "bad.ctmq", input_size=bad)
    export_binary(model, tmp_path / "one.ctmq", input_size=1)  # the smallest image
    x = torch.randn(2, 3, 1, 1)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(deploy.load(tmp_path / "one.ctmq")(x), want, rtol=1e-5, atol=1e-5)


class TwoFloatPaths(nn.Module):
    """A float add of two float convs (not a binary conv's residual), and
    torch.relu in its function form."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.q = QConv2d(8, 8, 3, padding=1, bias=False, w_bits=1, a_bits=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.q(self.stem(x))
        x = torch.relu(self.a(x) + self.b(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("engine", ["executor", "python", "native"])
def test_a_float_add_and_torch_relu_deploy_on_every_engine(tmp_path, engine):
    torch.manual_seed(0)
    model = TwoFloatPaths().eval()
    header = export_binary(model, tmp_path / "m.ctmq", input_size=6)
    assert [n["op"] for n in header["nodes"]].count("add") == 1
    assert "relu" in [n["op"] for n in header["nodes"]]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    rt = deploy.load(tmp_path / "m.ctmq", engine=engine)
    got = rt(x.numpy()) if engine == "native" else rt(x)
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-5, atol=1e-5)


def test_a_graph_must_have_nodes_and_fitting_residuals(tmp_path):
    with pytest.raises(ArtifactError, match="the header has no node list"):
        write_artifact(tmp_path / "x.ctmq", {"nodes": []}, {})
    with pytest.raises(ArtifactError, match="the header has no node list"):
        write_artifact(tmp_path / "x.ctmq", {}, {})
    assert not list(tmp_path.iterdir())
    header, tensors = _small_artifact(tmp_path)
    (conv,) = [n for n in header["nodes"] if n["op"] == "binary_conv" and len(n["in"]) == 2]
    conv["in"][1] = "input"  # a residual of the image's shape, not the output's
    with pytest.raises(ArtifactError, match=r"residual of shape \(3, 16, 16\) does not match"):
        deploy.Runtime(header, tensors)


def test_a_one_element_list_is_a_pair(tmp_path):
    """stride [2] reads as (2, 2), as the exporter's tuples do."""
    from bad_artifacts import rewrite_header

    export_binary(_quiet_bn(Functional()), tmp_path / "m.ctmq", input_size=16)

    def edit(h):
        for n in h["nodes"]:
            if n["op"] == "binary_conv":
                n["stride"], n["padding"] = [n["stride"][0]], [n["padding"][0]]

    rewrite_header(tmp_path / "m.ctmq", tmp_path / "one.ctmq", edit)
    x = torch.randn(2, 3, 16, 16)
    want = deploy.load(tmp_path / "m.ctmq")(x)
    assert torch.equal(deploy.load(tmp_path / "one.ctmq")(x), want)


def test_load_refuses_an_unknown_engine(tmp_path):
    export_binary(OnePixel().eval(), tmp_path / "m.ctmq", input_size=1)
    with pytest.raises(ValueError, match=r"engine must be one of .*got 'fast'"):
        deploy.load(tmp_path / "m.ctmq", engine="fast")


def test_header_limits_are_the_native_loaders():
    """No artifact is written that the native loader's JSON limits refuse."""
    import re

    from ctmq.artifact import format as fmt

    text = (ROOT / "csrc" / "runtime" / "json.h").read_text()
    assert f"size_t max_depth = {fmt.MAX_HEADER_DEPTH};" in text
    assert re.search(r"size_t max_bytes = size_t\{64\} << 20;", text)
    assert fmt.MAX_HEADER_BYTES == 64 << 20
    header = {"nodes": [{"op": "output", "in": ["input"], "out": "output"}]}
    deep = []
    for _ in range(fmt.MAX_HEADER_DEPTH):
        deep = [deep]
    ok = dict(header, input={"channels": 1, "size": 2, "mean": [0.0], "std": [1.0]})
    ok["class_names"] = ["a"]
    with pytest.raises(ArtifactError, match="nests deeper than 64 levels"):
        fmt.write_artifact("/nonexistent/never.ctmq", dict(ok, architecture=deep), {})


def test_headers_up_to_the_limits_are_read_by_both_loaders(tmp_path):
    """Nesting one level short of MAX_HEADER_DEPTH, in lists and in objects,
    is written and read by ctmq.deploy and by the native loader alike; a file
    whose header length overruns it is named truncated by both."""
    from ctmq.artifact import format as fmt

    header, tensors = _small_artifact(tmp_path)
    lists, objects = [], {}
    for _ in range(fmt.MAX_HEADER_DEPTH - 2):  # "architecture" itself is at depth 1
        lists, objects = [lists], {"a": objects}
    for deep in (lists, objects):
        path = tmp_path / "deep.ctmq"
        write_artifact(path, dict(header, architecture=deep), tensors)
        assert read_artifact(path)[0]["architecture"] == deep
        deploy.load(path, engine="native")
    blob = (tmp_path / "m.ctmq").read_bytes()
    (tmp_path / "short.ctmq").write_bytes(blob[:108])
    for engine in ("executor", "native"):
        with pytest.raises(
            ArtifactError, match=r"truncated: its header claims \d+ bytes, the file has 100"
        ):
            deploy.load(tmp_path / "short.ctmq", engine=engine)


def test_a_long_bad_value_is_quoted_to_200_characters(tmp_path):
    header, tensors = _small_artifact(tmp_path)
    names = [1] * 66  # repr: 198 characters, quoted whole
    exact = [100] + [1] * 65  # repr: exactly 200, quoted whole
    long_ = [1] * 67  # repr: 201, cut at 200
    for value, quoted in (
        (names, repr(names)),
        (exact, repr(exact)),
        (long_, repr(long_)[:200] + "..."),
    ):
        with pytest.raises(ArtifactError) as info:
            write_artifact(tmp_path / "x.ctmq", dict(header, class_names=value), tensors)
        assert str(info.value) == f"class_names must be a list of strings, got {quoted}"


class BareParameter(OnePixel):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return super().forward(x) * self.gain


def test_a_tensor_used_outside_a_layer_is_named(tmp_path):
    with pytest.raises(ExportError, match="get_attr gain.*a tensor used outside a layer"):
        export_binary(BareParameter().eval(), tmp_path / "m.ctmq", input_size=1)
    assert not list(tmp_path.iterdir())
