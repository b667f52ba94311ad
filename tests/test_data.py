"""ctmq.data: digits, IDX and CIFAR readers, and their errors (nothing downloads)."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from ctmq import data


def test_digits_fixed_split():
    d = data.load("digits")
    assert len(d.train) == 1437 and len(d.test) == 360
    assert d.num_classes == 10 and d.in_channels == 1 and d.image_size == 8
    x0, y0 = d.train[0]
    again = data.load("digits")
    assert torch.equal(again.train[0][0], x0) and again.train[0][1] == y0
    xs = torch.stack([d.train[i][0] for i in range(len(d.train))])
    assert abs(xs.mean().item()) < 1e-4  # normalized with train statistics


def _write_idx(path, array, gz, type_byte=0x08, dtype=np.uint8):
    header = struct.pack(">BBBB", 0, 0, type_byte, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + array.astype(dtype).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (20, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    for split, x in imgs.items():
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", x, gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, len(x)), gz)
    d = data.load("fashion-mnist", str(tmp_path))
    assert len(d.train) == 20 and len(d.test) == 6 and d.image_size == 28
    assert d.class_names[9] == "Ankle boot"


def test_idx_errors_name_the_path(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.*expected layout"):
        data.load("mnist", str(tmp_path))
    x = np.zeros((5, 4, 4))
    _write_idx(tmp_path / "train-images-idx3-ubyte", x, False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-7])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(str(tmp_path / "train-images-idx3-ubyte"))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:10])
    with pytest.raises(data.DataError, match="header of 3 dimensions is truncated"):
        data.read_idx(str(tmp_path / "train-images-idx3-ubyte"))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(str(tmp_path / "bad"))


def test_idx_data_type_other_than_unsigned_byte_is_refused(tmp_path):
    """A float (or any non-0x08) IDX file is refused, naming the file and its type."""
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4)), False, 0x0D, ">f4")
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte: IDX data type 0x0D \(float32\)"
    ):
        data.read_idx(str(tmp_path / "train-images-idx3-ubyte"))
    _write_idx(tmp_path / "labels", np.zeros(8), False, 0x0B, ">i2")
    with pytest.raises(ValueError, match=r"labels: IDX data type 0x0B \(int16\)"):
        data.read_idx(str(tmp_path / "labels"))


def test_idx_dimension_count_is_checked(tmp_path):
    """Images must declare 3 dimensions and labels 1; another count names the file."""
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (4, 7, 7)), False)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, 4), False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 49)), False)
    with pytest.raises(
        ValueError, match="t10k-images-idx3-ubyte: IDX file declares 2 dimensions, expected 3"
    ):
        data.load("mnist", str(tmp_path))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 7, 7)), False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, (4, 1)), False)
    with pytest.raises(
        ValueError, match="train-labels-idx1-ubyte: IDX file declares 2 dimensions, expected 1"
    ):
        data.load("mnist", str(tmp_path))
    assert data.read_idx(str(tmp_path / "train-labels-idx1-ubyte")).shape == (
        4,
        1,
    )  # no count asked


def _cifar_batch(n, labels_key=b"labels"):
    rng = np.random.default_rng(1)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        labels_key: list(rng.integers(0, 10, n).tolist()),
    }


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(4), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    d = data.load("cifar10", str(tmp_path))
    assert len(d.train) == 20 and len(d.test) == 4 and d.image_size == 32
    assert d.class_names[3] == "c3" and d.augment


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_reader_refuses_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": _Evil()}, f)
    with pytest.raises(data.DataError, match="not allowed"):
        data.load("cifar100", str(tmp_path))


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load("svhn")
    with pytest.raises(data.DataError, match="needs --data-root"):
        data.load("mnist")
    with pytest.raises(data.DataError, match="not a directory"):
        data.load("cifar10", str(tmp_path / "nope"))


def test_augment_batch_shapes_and_content():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    y = data.augment_batch(x, pad=2)
    assert y.shape == x.shape
    assert set(y.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_augment_batch_keeps_channels_last():
    x = torch.randn(3, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    y = data.augment_batch(x, pad=2)
    torch.manual_seed(0)
    plain = data.augment_batch(x.contiguous(), pad=2)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.equal(y, plain) and plain.is_contiguous()
