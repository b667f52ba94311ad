"""Bad artifacts, one per way a file can be wrong, and the words the refusal
must say: the table that drives both loaders' tests (ctmq.deploy's in
test_deploy.py, the native runtime's in test_native.py), so that both refuse
the same files with the same messages."""

import json
import struct

import torch
from model_helpers import binarized_resnet18

from ctmq import deploy
from ctmq.export import export_binary


def rewrite_header(src, dst, edit, extra=None):
    """An artifact with an edited header (plus the tensors `extra`) and a
    correct checksum, as a newer ctmq or a hand-edited file would write it."""
    from safetensors.torch import load_file, save_file

    from ctmq.artifact import artifact_checksum

    header, tensors = deploy.read_artifact(src)
    edit(header)
    tensors = dict(load_file(str(src)), **(extra or {}))
    header["checksum"] = artifact_checksum(header, tensors)
    save_file(tensors, str(dst), metadata={"ctmq": json.dumps(header)})


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _first(h, op):
    return next(n for n in h["nodes"] if n["op"] == op)


def _packed_into_float_op(h):
    """A Bi-Real block's second conv made to output packed bits, which the
    next block reads as a float."""
    _first(h, "binary_conv")["output"] = "packed"


def _wrong_in_channels(h):
    """20 input channels: the same word count as the 16 that arrive."""
    _first(h, "binary_conv")["in_channels"] = 20


def _nine_by_nine(h):
    node = _first(h, "binary_conv")
    node.update(weight="nine.bits", padding=[4, 4])


def make_cases(tmp_path):
    """{file name in tmp_path: regex its refusal matches}."""
    m = binarized_resnet18("cifar", "bireal", 8)
    good = tmp_path / "m.ctmq"
    export_binary(m, good, input_size=8)
    blob = good.read_bytes()
    cases = {}
    (tmp_path / "trunc.ctmq").write_bytes(blob[: len(blob) // 2])
    cases["trunc.ctmq"] = "truncated|corrupt"
    flipped = bytearray(blob)
    flipped[-100] ^= 0xFF
    (tmp_path / "flip.ctmq").write_bytes(bytes(flipped))
    cases["flip.ctmq"] = "checksum mismatch"
    (header_len,) = struct.unpack("<Q", blob[:8])
    broken = bytearray(blob)
    broken[8 + blob[8 : 8 + header_len].index(b":")] = ord("{")  # the JSON no longer parses
    (tmp_path / "hdr.ctmq").write_bytes(bytes(broken))
    cases["hdr.ctmq"] = "no readable ctmq header|corrupt"
    rewrite_header(good, tmp_path / "new.ctmq", lambda h: h.update(version=99))
    cases["new.ctmq"] = "version 99 is newer"
    rewrite_header(
        good,
        tmp_path / "op.ctmq",
        lambda h: h["nodes"].insert(0, {"op": "xnor_lstm", "in": ["input"], "out": "z"}),
    )
    cases["op.ctmq"] = "unknown layer type.*xnor_lstm"

    def edit_binary(key, value):
        def edit(h):
            next(n for n in h["nodes"] if n["op"] == "binary_conv")[key] = value

        return edit

    for key, value, words in (
        ("stride", "two", "stride must be an int"),
        ("padding", [-1, 0], "padding must be >= 0"),
        ("scale", "nope", "'nope'"),
        ("in_channels", 999, "not packed for 999 input channels"),
        ("output", "int8", "output must be 'float' or 'packed'"),
    ):
        rewrite_header(good, tmp_path / f"bin_{key}.ctmq", edit_binary(key, value))
        cases[f"bin_{key}.ctmq"] = f"binary_conv node .*{words}"
    (tmp_path / "tiny.ctmq").write_bytes(b"abc")
    cases["tiny.ctmq"] = "truncated"

    def edit_node(op, key, value):
        def edit(h):
            next(n for n in h["nodes"] if n["op"] == op)[key] = value

        return edit

    # crafted headers with a valid checksum: each is refused at load, naming the node
    header, tensors = deploy.read_artifact(good)
    first = tensors[_first(header, "binary_conv")["weight"]]  # 16 input channels
    extra = {"nine.bits": torch.zeros(first.shape[0], 9, 9, first.shape[3], dtype=torch.int32)}
    for name, edit, words in (
        ("undef", edit_node("global_avg_pool", "in", ["v999"]), r"reads \['v999'\], not defined"),
        ("arity", edit_node("linear", "in", []), "needs 1..1 input names"),
        ("listop", lambda h: h["nodes"][0].update(op=["conv2d"]), "unknown layer type"),
        ("listin", edit_node("linear", "in", [["v1"]]), "needs 1..1 input names"),
        ("version", lambda h: h.update(version=True), "not a version number"),
        # deeper than the loaders' JSON limit (MAX_HEADER_DEPTH), checksum valid
        ("deep", lambda h: h.update(architecture=_nested(70)), "no readable ctmq header"),
        ("packed", _packed_into_float_op, "fails on a \\(1, 3, 8, 8\\) input"),
        ("inch", _wrong_in_channels, "expects 20 input channels, got 16"),
        ("taps", _nine_by_nine, "at most 64 taps"),
        (
            "huge",
            edit_node("binary_conv", "padding", [2**31, 0]),
            r"padding must be .* < 2\^31|in \[0, 2\^31\)|padding must be <= 16384",
        ),
        ("mean", lambda h: h["input"].update(mean=["0.5", "0.5", "0.5"]), "one nonzero std"),
        ("chan", lambda h: h["input"].update(channels=True), "one nonzero std"),
        ("dup", lambda h: h["nodes"][1].update(out=h["nodes"][0]["out"]), "must be a new value"),
        ("noout", lambda h: h["nodes"].pop(), "must end with its one 'output' node"),
        ("outname", lambda h: h["nodes"][-1].update(out="logits"), "must be named 'output'"),
        (
            "twoout",
            lambda h: h["nodes"].insert(0, {"op": "output", "in": ["input"], "out": "o"}),
            "must end with its one 'output' node",
        ),
        (
            "convw",
            edit_node("conv2d", "weight", "missing.weight"),
            "conv2d node .*weight names no tensor of the file: 'missing.weight'",
        ),
        ("eps", edit_node("batch_norm", "eps", "small"), "batch_norm node .*eps must be a float"),
        (
            "fcw",
            edit_node("linear", "weight", "conv1.weight"),
            r"linear node .*weight \(conv1.weight\) must be 2-D",
        ),
        ("bnlen", edit_node("batch_norm", "mean", "fc.bias"), "mean .* of length"),
        ("input", lambda h: h["input"].update(std=[1.0]), "one nonzero std"),
        ("classes", lambda h: h.update(class_names=[1, 2]), "class_names must be a list of str"),
    ):
        rewrite_header(good, tmp_path / f"{name}.ctmq", edit, extra)
        cases[f"{name}.ctmq"] = words
    # hostile headers: an input far too large, a header nested past any reader's depth
    rewrite_header(
        good, tmp_path / "huge_input.ctmq", lambda h: h["input"].update(size=100000), None
    )
    cases["huge_input.ctmq"] = r"size \(1..16384\)"
    from safetensors.torch import load_file, save_file

    header, _ = deploy.read_artifact(good)
    text = json.dumps(header)[:-1] + ', "notes": ' + "[" * 5000 + "]" * 5000 + "}"
    save_file(load_file(str(good)), str(tmp_path / "deep.ctmq"), metadata={"ctmq": text})
    cases["deep.ctmq"] = "no readable ctmq header"
    return cases
