"""ctmq.export + ctmq.deploy: the runtime reproduces the trained model's eval
logits, layer by layer; bad artifacts and inputs fail clearly."""

import contextlib
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bad_artifacts import make_cases, rewrite_header
from model_helpers import binarized_resnet18

import ctmq
from ctmq import binary, cli, deploy
from ctmq.export import ExportError, export_binary
from ctmq.models import resnet as resnet_mod
from ctmq.models import resnet18
from ctmq.nn import QConv2d, conv_bn, fold_binary_conv_bn, set_bits

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ctmq.has_extension(), reason="ctmq._C not built")


@pytest.mark.parametrize("stem,size", [("cifar", 8), ("imagenet", 32)])
@pytest.mark.parametrize("block", ["bireal", "basic"])
@pytest.mark.parametrize("batch", [1, 7])
def test_runtime_matches_eval_logits(tmp_path, stem, size, block, batch):
    m = binarized_resnet18(stem, block, size)
    path = tmp_path / "m.ctmq"
    export_binary(m, path, input_size=size)
    rt = deploy.load(path)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        ref = m(x)
    y = rt(x)
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-4
    assert torch.equal(y.argmax(1), ref.argmax(1))
    assert torch.equal(y, ref)  # in fact bit for bit: same folding, same order


def test_packed_activations_agree_layer_by_layer(tmp_path, monkeypatch):
    for block in ("bireal", "basic"):
        m = binarized_resnet18("cifar", block, 8, seed=1)
        export_binary(m, tmp_path / "m.ctmq", input_size=8)
        rt = deploy.load(tmp_path / "m.ctmq")
        seen = []
        real = resnet_mod.conv_bn

        def record(conv, bn, x, seen=seen, real=real):
            seen.append(x >= 0)
            return real(conv, bn, x)

        monkeypatch.setattr(resnet_mod, "conv_bn", record)
        x = torch.randn(3, 3, 8, 8)
        with torch.no_grad():
            m(x)
        monkeypatch.setattr(resnet_mod, "conv_bn", real)
        _, env = rt.run(x, trace=True)
        inputs = [env[n["in"][0]] for n in rt.header["nodes"] if n["op"] == "binary_conv"]
        assert len(inputs) == len(seen) == 16
        packed_links = 0
        for got, want in zip(inputs, seen, strict=True):
            if isinstance(got, binary.PackedActivation):
                packed_links += 1
                got = binary.unpack_bits(got.bits, got.channels) > 0
            else:
                got = got >= 0
            assert torch.equal(got, want)
        assert packed_links == (8 if block == "basic" else 0)


@pytest.mark.slow
def test_digits_run_export_infer_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--width",
                "0.25",
                "--cycles",
                "1",
                "--start-bits",
                "2",
                "--epochs-per-stage",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    art = tmp_path / "digits.ctmq"
    assert cli.main(["export", str(out), "-o", str(art)]) == 0
    assert "smaller than the float32 checkpoint" in capsys.readouterr().out
    # the deployed model predicts every test digit as the trained model does
    from ctmq import data
    from ctmq.cli.deploy import find_checkpoint
    from ctmq.engine import model_from_checkpoint

    d = data.load("digits")
    x, y = d.test.tensors
    m, meta = model_from_checkpoint(find_checkpoint(str(out))[0])
    assert meta["stage"]["w_bits"] == meta["stage"]["a_bits"] == 1
    m.eval()
    rt = deploy.load(art)
    with torch.no_grad():
        ref = m(x)
    got = rt(x)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # infer on an image file and on a saved tensor
    from PIL import Image

    img = ((x[0, 0] * d.std[0] + d.mean[0]).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(img).save(tmp_path / "digit.png")
    torch.save(x[:2].clone(), tmp_path / "two.pt")
    capsys.readouterr()
    assert cli.main(["infer", str(art), str(tmp_path / "digit.png"), "--topk", "3"]) == 0
    assert (
        cli.main(["infer", str(art), str(tmp_path / "two.pt"), "--json", str(tmp_path / "p.json")])
        == 0
    )
    preds = json.loads((tmp_path / "p.json").read_text())
    assert [p["top"][0][0] for p in preds] == [str(i) for i in ref[:2].argmax(1).tolist()]
    assert cli.main(["bench", "deploy", str(art), "--batch", "1"]) == 0


def _first(h, op):
    return next(n for n in h["nodes"] if n["op"] == op)


def test_bad_artifacts_fail_clearly(tmp_path, capsys):
    cases = make_cases(tmp_path)
    for name, words in cases.items():
        with pytest.raises(deploy.ArtifactError, match=words):
            deploy.load(tmp_path / name)
        assert cli.main(["infer", str(tmp_path / name), str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "ctmq infer: error:" in err and "Traceback" not in err


def test_weight_bits_past_in_channels_are_ignored(tmp_path):
    """Bits past a binary conv's in_channels (zero as exported) do not change
    the logits: the runtime clears them at load."""
    m = binarized_resnet18("cifar", "bireal", 8)
    good = tmp_path / "m.ctmq"
    export_binary(m, good, input_size=8)
    header, tensors = deploy.read_artifact(good)
    name = _first(header, "binary_conv")["weight"]  # 16 input channels: 16 spare bits
    dirty = tensors[name].clone()
    dirty[..., -1] |= -(1 << 16)
    rewrite_header(good, tmp_path / "dirty.ctmq", lambda h: None, {name: dirty})
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(deploy.load(tmp_path / "dirty.ctmq")(x), deploy.load(good)(x))


def test_bad_inputs_and_non_binarized_export(tmp_path, capsys):
    m = binarized_resnet18("cifar", "bireal", 8)
    export_binary(m, tmp_path / "m.ctmq", input_size=8)
    rt = deploy.load(tmp_path / "m.ctmq")
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\)"):
        rt(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(N, 3, 8, 8\)"):
        rt(torch.randn(2, 3, 9, 9))
    with pytest.raises(TypeError, match="float tensor"):
        rt(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    bad = torch.randn(2, 3, 8, 8)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        rt(bad)
    np.save(tmp_path / "gray.npy", np.zeros((1, 1, 8, 8), np.float32))
    assert cli.main(["infer", str(tmp_path / "m.ctmq"), str(tmp_path / "gray.npy")]) == 2
    assert "shape (N, 3, 8, 8)" in capsys.readouterr().err
    set_bits(m, 2, 2)
    m.layer3[1].conv1.set_bits(1, 1)
    with pytest.raises(ExportError, match=r"not W1A1: layer1.0.conv1 \(W2A2\)"):
        export_binary(m, tmp_path / "x.ctmq")
    assert not (tmp_path / "x.ctmq").exists()


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 0)])
def test_folded_binary_conv_bn_equals_unfolded_batchnorm(stride, pad):
    """The folded scale/bias on the sign conv (eval path and deploy kernel) equal a W1A1
    QConv2d followed by an eval-mode nn.BatchNorm2d, eps included."""
    torch.manual_seed(0)
    o = 24
    conv = QConv2d(40, o, 3, stride=stride, padding=pad, bias=False, w_bits=1, a_bits=1)
    bn = torch.nn.BatchNorm2d(o).eval()
    with torch.no_grad():
        bn.running_var.copy_(
            10 ** torch.empty(o).uniform_(-4, -2)
        )  # eps = 1e-5 is 0.1% to 10% of it
        bn.running_mean.copy_(torch.randn(o) * 0.5)
        bn.weight.copy_(torch.rand(o) + 0.5)
        bn.bias.copy_(torch.randn(o))
        x = torch.randn(2, 40, 9, 9)
        ref = bn(conv(x))  # float conv of sign(x) with alpha * sign(w), then torch's BatchNorm
        scale, bias = fold_binary_conv_bn(conv, bn)
        deployed = binary.binary_conv2d(
            x, binary.pack_weight(conv.weight), stride=stride, padding=pad, scale=scale, bias=bias
        )
        evaluated = conv_bn(conv, bn, x)
    tol = dict(rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(deployed, ref, **tol)
    torch.testing.assert_close(evaluated, ref, **tol)


def test_runtime_max_pool_equals_torch(monkeypatch):
    """The CPU runtime's max pool (oneDNN's) gives F.max_pool2d's values, -inf included."""
    from ctmq.deploy.ops import max_pool2d as _max_pool2d

    for shape, k, s, p in (
        ((1, 64, 112, 112), 3, 2, 1),
        ((3, 5, 9, 7), 3, 2, 1),
        ((2, 33, 8, 8), 2, 2, 0),
    ):
        x = torch.randn(*shape)
        x.view(-1)[::89] = float("-inf")
        y = _max_pool2d(x, (k, k), (s, s), (p, p))
        assert y.is_contiguous() and torch.equal(y, F.max_pool2d(x, k, s, p))
        # float64 (and any non-float32 or non-CPU tensor) takes torch's own pool
        y = _max_pool2d(x.double(), (k, k), (s, s), (p, p))
        assert y.dtype == torch.float64 and torch.equal(y, F.max_pool2d(x.double(), k, s, p))
        with monkeypatch.context() as m:  # a torch without oneDNN: torch's channels_last pool
            m.setattr(torch.backends.mkldnn, "is_available", lambda: False)
            y = _max_pool2d(x, (k, k), (s, s), (p, p))
            assert y.is_contiguous() and torch.equal(y, F.max_pool2d(x, k, s, p))


def test_export_refuses_run_without_w1a1(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "-o", str(tmp_path / "m.ctmq")]) == 2
    assert "no W1A1 stage checkpoint" in capsys.readouterr().err


def test_artifact_much_smaller_than_float_checkpoint(tmp_path):
    m = binarized_resnet18("imagenet", "bireal", 32)
    m2 = resnet18(1000, stem="imagenet")
    set_bits(m2, 1, 1)
    m2.eval()
    export_binary(m2, tmp_path / "full.ctmq")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m2.state_dict().items()}, str(tmp_path / "full.st"))
    ratio = (tmp_path / "full.st").stat().st_size / (tmp_path / "full.ctmq").stat().st_size
    assert ratio >= 10, ratio
    del m


def _assert_logits_close(got, want, what=""):
    """CUDA against CPU logits: within 1e-4 of the logits' scale (the float
    stem rounds differently under cuDNN), and the same top class wherever the
    CPU's top two are further apart than that (a near tie may flip)."""
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale, what
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2e-4 * scale
    assert torch.equal(got.argmax(1)[clear], want.argmax(1)[clear]), what


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["default", "bmma"])
def test_cuda_runtime_graph_replay_with_new_inputs(tmp_path, kernel):
    if kernel == "bmma" and "bmma" not in binary.cuda_kernels():
        pytest.skip("ctmq._C was built without the CUDA kernels, or the GPU is older than sm_80")
    with binary.use_kernel(kernel) if kernel != "default" else contextlib.nullcontext():
        _check_cuda_runtime_graph_replay(tmp_path)


def _check_cuda_runtime_graph_replay(tmp_path):
    m = binarized_resnet18("imagenet", "basic", 32)
    export_binary(m, tmp_path / "m.ctmq", input_size=32)
    rt = deploy.load(tmp_path / "m.ctmq", device="cuda")
    cpu = deploy.load(tmp_path / "m.ctmq")
    tf32 = torch.backends.cudnn.allow_tf32
    for _ in range(3):  # the same captured graph, replayed on new inputs
        x = torch.randn(7, 3, 32, 32)
        got, want = rt(x.cuda()).cpu(), cpu(x)
        assert torch.backends.cudnn.allow_tf32 == tf32  # the runtime's IEEE fp32 is scoped
        _assert_logits_close(got, want)
    assert len(rt._graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runtime_switching_kernels_keeps_graphs_valid(tmp_path):
    """A graph captured with bmma, then triton at another batch size, then the
    bmma graph again: each replay still reads its own weight layout."""
    if "bmma" not in binary.cuda_kernels():
        pytest.skip("ctmq._C was built without the CUDA kernels, or the GPU is older than sm_80")
    m = binarized_resnet18("imagenet", "basic", 32)
    export_binary(m, tmp_path / "m.ctmq", input_size=32)
    rt, cpu = deploy.load(tmp_path / "m.ctmq", device="cuda"), deploy.load(tmp_path / "m.ctmq")
    for kernel, batch in (("bmma", 7), ("triton", 3), ("bmma", 7), ("triton", 7)):
        x = torch.randn(batch, 3, 32, 32)
        with binary.use_kernel(kernel):
            got = rt(x.cuda()).cpu()
        want = cpu(x)
        _assert_logits_close(got, want, kernel)
    assert len(rt._graphs) == 3


def test_an_artifact_of_format_version_2_still_loads_with_its_logits():
    """tests/data/vgg_small_v2.ctmq was written by the format-version-2
    exporter (before the op table), beside the model's eval logits on two
    images: every engine reads it and gives those logits (to float rounding:
    the logits were computed on another CPU's float kernels)."""
    data_dir = ROOT / "tests" / "data"
    path = data_dir / "vgg_small_v2.ctmq"
    assert deploy.read_artifact(path)[0]["version"] == 2
    with np.load(data_dir / "vgg_small_v2.npz") as arrays:
        x, want = arrays["x"], arrays["logits"]
    for engine in ("executor", "python", "native"):
        rt = deploy.load(path, engine=engine)
        got = np.asarray(rt(x) if engine == "native" else rt(torch.from_numpy(x)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=engine)
