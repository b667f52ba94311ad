"""benchmarks/bench_loader.py: the input-pipeline benchmark runs end to end on a
tiny tree and reports sane numbers; its synthetic JPEGs are photo-sized; its
torchvision stand-in computes what ctmq's imagenet path computes."""

import importlib.util
import json
import math
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image


def _module():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_run_reports_each_worker_count(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "loader.json"
    assert (
        mod.main(["--quick", "--workers", "0,2", "--gpu-images-per-s", "1000", "--json", str(out)])
        == 0
    )
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["workers"] for r in rows] == [0, 2]
    for r in rows:
        for key in (
            "images_per_s",
            "ms_per_batch",
            "core_ms_per_image",
            "images_per_s_per_core",
            "first_batch_s",
            "cores_for_gpu",
        ):
            assert _positive(r[key]), (key, r)
        assert r["cpu_ms_per_image"] is None or _positive(r["cpu_ms_per_image"])
        assert r["batches"] >= 2 and r["batches"] % max(r["workers"], 1) == 0
        # images/s and ms/batch are one measurement: batch 8 in --quick
        assert r["images_per_s"] * r["ms_per_batch"] / 1e3 == pytest.approx(8, rel=1e-6)
        assert r["cores_for_gpu"] == pytest.approx(1000 / r["images_per_s_per_core"])
    assert data["batch"] == 8 and data["train_images"] >= 3 * 8 and data["cores"] >= 1
    assert all(_positive(ms) for ms in data["breakdown_ms"].values())
    assert set(data["breakdown_ms"]) >= {
        "read+decode",
        "RandomResizedCrop",
        "ToTensor",
        "Normalize",
    }

    text = capsys.readouterr().out
    assert f"{data['cores']} cores" in text and "load average" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["workers", "batches"])
    table = [line.split() for line in lines[head + 1 : head + 1 + len(rows)]]
    assert [int(t[0]) for t in table] == [0, 2]
    for t in table:
        assert all(_positive(float(v)) for v in t[1:] if v != "-"), t
    assert "to feed 1000 images/s" in text


def test_synthetic_jpegs_are_photo_sized(tmp_path):
    mod = _module()
    sizes = mod.make_tree(str(tmp_path), classes=1, per_class=3, seed=0, val_per_class=1)
    assert len(sizes) == 3
    assert all(80e3 < s < 200e3 for s in sizes), sizes  # ImageNet's JPEGs: about 110 KB
    files = sorted((tmp_path / "train" / "class_000").iterdir())
    assert len(files) == 3 and (tmp_path / "val" / "class_000").is_dir()
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (500, 375)
        arr = np.asarray(im.convert("RGB"), np.float32)
    assert 20 < arr.std() < 90  # neither flat colour nor saturated noise
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[1])))


def test_standin_normalizes_like_ctmq(tmp_path):
    """A flat image stays flat under crop, resize and flip: every output pixel
    is (value / 255 - mean) / std with ctmq's ImageNet mean and std."""
    mod = _module()
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (300, 200), (255, 128, 0)).save(folder / "x.png")
    Image.new("RGB", (50, 400), (10, 20, 30)).save(
        folder / "y.PNG"
    )  # extreme aspect: fallback crop
    data = mod.load_standin(str(tmp_path))
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    for i, rgb in enumerate([(255, 128, 0), (10, 20, 30)]):
        x, y = data.train[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
        want = (torch.tensor(rgb) / 255 - torch.tensor(data.mean)) / torch.tensor(data.std)
        assert torch.allclose(x, want.view(3, 1, 1).expand_as(x), atol=1e-6)


def test_standin_matches_ctmq_imagenet_path(tmp_path):
    """Where torchvision works, the stand-in gives bit-identical tensors to
    ctmq.data.load('imagenet') under the same seed."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # not installed, or a build that does not fit this torch
        pytest.skip(f"torchvision unusable here: {type(e).__name__}: {e}")
    mod = _module()
    mod.make_tree(str(tmp_path), classes=2, per_class=4, seed=1, val_per_class=1)
    Image.new("RGB", (1000, 100), (1, 2, 3)).save(tmp_path / "train" / "class_000" / "wide.jpg")
    ref, pipeline = mod.load_pipeline(str(tmp_path), "ctmq")
    assert pipeline.startswith("ctmq.data.load")
    ours = mod.load_standin(str(tmp_path))
    assert ref.train.samples == ours.train.samples
    for i in range(len(ours.train)):
        torch.manual_seed(i)
        a, ya = ref.train[i]
        torch.manual_seed(i)
        b, yb = ours.train[i]
        assert ya == yb and torch.equal(a, b), i


def test_rejects_bad_arguments():
    mod = _module()
    for argv in (
        ["--workers", "a"],
        ["--workers", "-1"],
        ["--batch", "0"],
        ["--gpu-images-per-s", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2


def test_missing_tree_is_an_error(tmp_path, capsys):
    mod = _module()
    assert mod.main(["--root", str(tmp_path / "nope"), "--pipeline", "standin"]) == 2
    assert "not found" in capsys.readouterr().err
    assert os.path.isdir(tmp_path)  # --root is never removed
