"""Datasets for ctmq train. Nothing is ever downloaded.

* digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, installed
  with scikit-learn), a fixed 1437/360 train/test split: the embedded default.
* mnist, fashion-mnist: the standard IDX files (gzip or not) in --data-root.
* cifar10, cifar100: the standard "python version" batches in --data-root,
  read with an unpickler that admits only plain containers and numpy arrays.
* imagenet: an ImageFolder tree (train/, val/) in --data-root, via torchvision.
"""

import dataclasses
import gzip
import io
import os
import pickle
import struct

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataError",
    "Data",
    "load",
    "load_digits_data",
    "load_idx_data",
    "load_cifar_data",
    "load_imagenet_data",
    "read_idx",
    "augment_batch",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet")


class DataError(ValueError):
    """A missing or malformed dataset: the message names the path and layout."""


@dataclasses.dataclass
class Data:
    """Train/test sets, as tensors in memory or as torch Datasets."""

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    class_names: list
    augment: bool = False  # random crop + flip on the training tensors


def _tensor_data(name, xtr, ytr, xte, yte, num_classes, class_names, augment=False):
    """Normalize uint8/float images (N, C, H, W) per channel with train statistics."""
    xtr = torch.as_tensor(np.array(xtr), dtype=torch.float32)
    xte = torch.as_tensor(np.array(xte), dtype=torch.float32)
    mean = xtr.mean(dim=(0, 2, 3))
    std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    norm = lambda x: (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # noqa: E731
    ds = torch.utils.data.TensorDataset
    return Data(
        name,
        ds(norm(xtr), torch.as_tensor(np.array(ytr), dtype=torch.long)),
        ds(norm(xte), torch.as_tensor(np.array(yte), dtype=torch.long)),
        num_classes,
        xtr.shape[1],
        xtr.shape[-1],
        tuple(mean.tolist()),
        tuple(std.tolist()),
        class_names,
        augment,
    )


def load_digits_data(seed=0):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))  # fixed split, seed 0
    tr, te = perm[:1437], perm[1437:]
    return _tensor_data("digits", x[tr], y[tr], x[te], y[te], 10, [str(i) for i in range(10)])


# ---------------------------------------------------------------- MNIST (IDX)
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _find(root, stem, layout):
    for cand in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        for folder in (root, os.path.join(root, "raw")):
            path = os.path.join(folder, cand)
            if os.path.isfile(path):
                return path
    raise DataError(f"{os.path.join(root, stem)}[.gz] not found; expected layout: {layout}")


# the IDX data-type byte (third byte of the magic); only unsigned bytes are read
_IDX_TYPES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def read_idx(path, ndim=None):
    """An IDX array (the MNIST format) of unsigned bytes, gzip or not; ndim, when
    given, is the number of dimensions the file must declare."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    if raw[2] != 0x08:
        raise DataError(
            f"{path}: IDX data type 0x{raw[2]:02X} ({_IDX_TYPES.get(raw[2], 'unknown')}); "
            "only 0x08 (unsigned byte) is supported"
        )
    declared = raw[3]
    if ndim is not None and declared != ndim:
        raise DataError(f"{path}: IDX file declares {declared} dimensions, expected {ndim}")
    if len(raw) < 4 + 4 * declared:
        raise DataError(f"{path}: header of {declared} dimensions is truncated")
    dims = struct.unpack(f">{declared}I", raw[4 : 4 + 4 * declared])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * declared)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: header says {dims} ({int(np.prod(dims))} bytes), "
            f"file holds {data.size}: truncated or corrupt"
        )
    return data.reshape(dims)


def load_idx_data(name, root):
    layout = ", ".join(f"{v}[.gz]" for v in _IDX_FILES.values()) + f" in {root}"
    arrays = {
        k: read_idx(_find(root, v, layout), ndim=3 if k.endswith("_x") else 1)
        for k, v in _IDX_FILES.items()
    }
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}: {split} images {x.shape} and labels {y.shape} do not match")
    classes = _FASHION if name == "fashion-mnist" else [str(i) for i in range(10)]
    return _tensor_data(
        name,
        arrays["train_x"][:, None] / 255.0,
        arrays["train_y"],
        arrays["test_x"][:, None] / 255.0,
        arrays["test_y"],
        10,
        classes,
    )


# ------------------------------------------------------------- CIFAR (pickle)
class _SafeUnpickler(pickle.Unpickler):
    """Admits the globals a CIFAR batch needs (numpy array reconstruction) and
    nothing else: no code runs from the file."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _load_batch(path):
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR python batch ({e})") from e
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    labels = d.get("labels", d.get("fine_labels"))
    if "data" not in d or labels is None:
        raise DataError(f"{path}: a CIFAR batch holds 'data' and 'labels'/'fine_labels'")
    x = np.asarray(d["data"], dtype=np.uint8)
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(labels):
        raise DataError(f"{path}: data {x.shape} is not N x 3072 for {len(labels)} labels")
    return x.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar_data(name, root):
    if name == "cifar10":
        folder, train, test, meta, key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "batches.meta",
            "label_names",
        )
    else:
        folder, train, test, meta, key = (
            "cifar-100-python",
            ["train"],
            ["test"],
            "meta",
            "fine_label_names",
        )
    base = os.path.join(root, folder) if os.path.isdir(os.path.join(root, folder)) else root
    layout = f"{root}/{folder}/{{{','.join(train + test)}}} (the python version)"
    parts = {}
    for split, files in (("train", train), ("test", test)):
        xs, ys = [], []
        for fname in files:
            path = os.path.join(base, fname)
            if not os.path.isfile(path):
                raise DataError(f"{path} not found; expected layout: {layout}")
            x, y = _load_batch(path)
            xs.append(x)
            ys.append(y)
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    n = 10 if name == "cifar10" else 100
    names = [str(i) for i in range(n)]
    meta_path = os.path.join(base, meta)
    if os.path.isfile(meta_path):
        with open(meta_path, "rb") as f:
            m = _SafeUnpickler(f, encoding="bytes").load()
        raw = m.get(key.encode(), m.get(key))
        if raw is not None and len(raw) == n:
            names = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
    return _tensor_data(
        name,
        parts["train"][0] / 255.0,
        parts["train"][1],
        parts["test"][0] / 255.0,
        parts["test"][1],
        n,
        names,
        augment=True,
    )


# ----------------------------------------------------------- ImageNet folder
def load_imagenet_data(root, image_size=224):
    try:
        from torchvision import datasets, transforms
    except ImportError as e:
        raise DataError("dataset 'imagenet' needs torchvision (pip install torchvision)") from e
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d} not found; expected layout: {root}/{{train,val}}/<class>/<image>")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = transforms.Normalize(mean, std)
    train = datasets.ImageFolder(
        train_dir,
        transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        ),
    )
    test = datasets.ImageFolder(
        val_dir,
        transforms.Compose(
            [
                transforms.Resize(int(image_size * 8 / 7)),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                norm,
            ]
        ),
    )
    return Data(
        "imagenet", train, test, len(train.classes), 3, image_size, mean, std, list(train.classes)
    )


def load(name, root=None):
    """The dataset `name` (one of DATASETS); root is required except for digits."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "digits":
        return load_digits_data()
    if root is None:
        raise DataError(f"dataset {name!r} needs --data-root (nothing is downloaded)")
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root} is not a directory")
    if name in ("mnist", "fashion-mnist"):
        return load_idx_data(name, root)
    if name in ("cifar10", "cifar100"):
        return load_cifar_data(name, root)
    return load_imagenet_data(root)


def augment_batch(x, pad=4):
    """Random crop with zero padding and horizontal flip, on a batch tensor; the
    result keeps a channels_last input's memory format."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    j = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (i[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (j[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    flip = torch.rand(n, device=x.device) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)  # the layout it came in
    return out
