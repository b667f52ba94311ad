"""Images/s of the ImageNet training input pipeline alone: JPEG read + decode,
RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize and batch
collation, through ctmq.engine.trainer.make_loaders (the DataLoader that
`ctmq train --dataset imagenet --workers W` builds: batch 256, shuffle,
drop_last, persistent workers, pin_memory only where CUDA is), for each worker
count. No model runs: this is the ceiling the loader puts on training speed.

The data: by default a synthetic ImageFolder tree written to a temp directory
(2 classes x 200 JPEGs of 500x375, quality 90, about 125 KB each: smooth
seeded noise with a gradient and fine texture, so that JPEG size, and with it
decode time, is that of a photo rather than of flat colour or pure noise);
--root DIR measures a real tree instead (DIR/train/<class>/<image>, and
DIR/val/ where ctmq's own loader is used, as `ctmq train --data-root DIR`).
The files are read from the page cache (the synthetic tree was just written):
a real tree larger than memory also pays for disk reads.

The pipeline: ctmq.data.load("imagenet") where torchvision imports. Without
torchvision (ctmq's imagenet path needs it), --pipeline auto uses a stand-in
written here with PIL and torch that does what torchvision's ImageFolder and
transforms do, call for call (PIL crop + bilinear resize, the same torch RNG
draws), so that it gives the same tensors and costs the same work; the output
says which one ran. ctmq's augment_batch is not part of this path (it is
CIFAR's on-device augmentation; Data.augment is False for imagenet).

Per worker count: the first batch is not timed (worker start-up; each worker
builds a whole batch), then --batches batches (rounded up to a multiple of the
worker count, so that every worker delivers the same number) give images/s
and ms/batch. core-ms/img = cores occupied (workers, at least 1, at most the
machine's cores) / images/s; cpu-ms/img = CPU seconds that the main process
and its workers really used (from /proc) per image, first batch included;
img/s/core = 1000 / cpu-ms/img. With --gpu-images-per-s R, each row also says
how many loader cores at its per-core rate feed R images/s (a floor: the
training process's own CPU work comes on top).

    python benchmarks/bench_loader.py [--workers 0,1,2] [--batch 256] [--batches 12]
        [--root DIR] [--pipeline auto|ctmq|standin] [--gpu-images-per-s R] [--json out.json] [--quick]
"""

import argparse
import dataclasses
import gc
import io
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from ctmq import bench
from ctmq import data as data_mod
from ctmq.engine.trainer import DistInfo, make_loaders

IMAGE_SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ctmq.data.load_imagenet_data's


# ------------------------------------------------------------ synthetic tree
_LEVELS = ((4, 3), (16, 12), (63, 47), (250, 188))  # coarse to fine noise octaves
_AMPS = (60, 50, 60, 80)
_FINE = 20


def synthetic_image(rng, size=(500, 375)):
    """A seeded RGB image with the statistics JPEG cares about: smooth structure
    at several scales (each octave upsampled bicubically from the last, mostly
    luminance with some colour), a gradient, and pixel-level luminance texture.
    At 500x375, quality 90: about 125 KB."""
    w, h = size
    img = None
    for (lw, lh), amp in zip(_LEVELS, _AMPS, strict=True):
        base = (
            np.full((lh, lw, 3), 128, np.int16)
            if img is None
            else np.asarray(img.resize((lw, lh), Image.BICUBIC), np.int16)
        )
        base += rng.integers(-amp, amp + 1, (lh, lw, 1), dtype=np.int16)
        base += rng.integers(-(amp // 3), amp // 3 + 1, base.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    arr = np.asarray(img.resize((w, h), Image.BICUBIC), np.int16)
    g = rng.uniform(-1, 1, 3)
    arr += (
        np.linspace(-40, 40, w)[None, :, None] * g
        + np.linspace(-30, 30, h)[:, None, None] * g[::-1]
    ).astype(np.int16)
    arr += rng.integers(-_FINE, _FINE + 1, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_tree(root, classes=2, per_class=200, size=(500, 375), quality=90, seed=0, val_per_class=2):
    """root/train/class_<k>/img_<i>.JPEG (and a few in root/val/, which ctmq's
    loader requires); returns the JPEG sizes in bytes of the train images."""
    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = os.path.join(root, split, f"class_{k:03d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                buf = io.BytesIO()
                synthetic_image(rng, size).save(buf, "JPEG", quality=quality)
                with open(os.path.join(folder, f"img_{i:05d}.JPEG"), "wb") as f:
                    f.write(buf.getvalue())
                if split == "train":
                    sizes.append(buf.tell())
    return sizes


# --------------------------------- stand-in for torchvision's ImageFolder path
# Each class does what its torchvision namesake (0.2x) does with a PIL image,
# with the same torch RNG calls in the same order, so that under one seed both
# give the same tensors (checked in tests/test_bench_loader.py where torchvision
# is installed).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_loader(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root, transform):
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise data_mod.DataError(f"{root}: no class folders; expected {root}/<class>/<image>")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), self.class_to_idx[c]))
        if not self.samples:
            raise data_mod.DataError(f"{root}: no images ({', '.join(IMG_EXTENSIONS)})")
        self.loader, self.transform = pil_loader, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class RandomResizedCrop:
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def get_params(self, img):
        width, height = img.size
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)  # fallback: central crop
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        i, j, h, w = self.get_params(img)
        return img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BILINEAR)


class RandomHorizontalFlip:
    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < 0.5 else img


class ToTensor:
    def __call__(self, pic):
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        img = (
            img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
        )
        return img.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        return tensor.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def load_standin(root, image_size=IMAGE_SIZE):
    """ctmq.data.Data for the train split of an ImageFolder tree, built like
    load_imagenet_data's train set; test is the same set (never iterated here)."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise data_mod.DataError(
            f"{train_dir} not found; expected layout: {root}/train/<class>/<image>"
        )
    train = ImageFolder(
        train_dir,
        Compose(
            [
                RandomResizedCrop(image_size),
                RandomHorizontalFlip(),
                ToTensor(),
                Normalize(MEAN, STD),
            ]
        ),
    )
    return data_mod.Data(
        "imagenet", train, train, len(train.classes), 3, image_size, MEAN, STD, list(train.classes)
    )


def load_pipeline(root, which="auto"):
    """(Data, description): ctmq.data.load("imagenet", root) where torchvision
    imports, else (auto) the stand-in."""
    if which in ("auto", "ctmq"):
        try:
            d = data_mod.load("imagenet", root)
            import torchvision

            return (
                d,
                f"ctmq.data.load('imagenet') (torchvision {torchvision.__version__} ImageFolder + transforms)",
            )
        except data_mod.DataError as e:
            if which == "ctmq" or not isinstance(e.__cause__, ImportError):
                raise
    return load_standin(root), (
        "stand-in for ctmq.data.load('imagenet'): PIL + torch, the same "
        "ImageFolder + RandomResizedCrop/flip/ToTensor/Normalize calls "
        "(torchvision is not installed)"
    )


# ------------------------------------------------------------------ measuring
class Resampled(torch.utils.data.Dataset):
    """n items drawn from base: a seeded permutation of all of it, repeated as
    often as n needs (a small tree), or its first n (a large one), so that one
    epoch of the loader covers the warm-up and all the timed batches."""

    def __init__(self, base, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        reps = -(-n // len(base))
        self.index = torch.cat([torch.randperm(len(base), generator=g) for _ in range(reps)])[
            :n
        ].tolist()
        self.base = base

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.base[self.index[i]]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def core_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _children_cpu():
    """{pid: CPU seconds} of this process's children, from /proc (None where unreadable)."""
    me, tick, out = os.getpid(), os.sysconf("SC_CLK_TCK"), {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            out[int(p)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def measure(data, workers, batch, batches, seed=0, pin_memory=False):
    """One worker count: returns the row (a dict)."""
    n = batches if workers == 0 else -(-batches // workers) * workers
    view = dataclasses.replace(data, train=Resampled(data.train, (1 + n) * batch, seed))
    torch.manual_seed(seed)
    before = _children_cpu()
    cpu0 = time.process_time()
    train, _ = make_loaders(view, batch, DistInfo(), seed, workers, pin_memory=pin_memory)
    t0 = time.perf_counter()
    it = iter(train)
    x, y = next(it)  # worker start-up and the first batch: not timed
    assert x.shape == (batch, 3, data.image_size, data.image_size), x.shape
    del x, y
    t1 = time.perf_counter()
    for _ in range(n):
        x, y = next(it)
        del x, y
    t2 = time.perf_counter()
    main_cpu = time.process_time() - cpu0
    after = _children_cpu()
    worker_cpu = None  # the workers of this loader: children that were not there before
    if before is not None and after is not None:
        worker_cpu = sum(s for pid, s in after.items() if pid not in before)
    it = train = None
    gc.collect()  # shuts the persistent workers down before the next count
    rate = n * batch / (t2 - t1)
    cores = min(max(workers, 1), core_count())
    per_image = 1e3 / ((1 + n) * batch)
    cpu_ms = None if worker_cpu is None else (main_cpu + worker_cpu) * per_image
    return {
        "workers": workers,
        "batches": n,
        "images_per_s": rate,
        "ms_per_batch": 1e3 * (t2 - t1) / n,
        "core_ms_per_image": 1e3 * cores / rate,
        "cpu_ms_per_image": cpu_ms,
        "main_cpu_ms_per_image": main_cpu * per_image,
        "worker_cpu_ms_per_image": None if worker_cpu is None else worker_cpu * per_image,
        "images_per_s_per_core": 1e3 / (cpu_ms if cpu_ms else 1e3 * cores / rate),
        "first_batch_s": t1 - t0,
    }


def breakdown(dataset, count=64, seed=0):
    """[(step, ms per image)] on one core in this process, no DataLoader: the
    loader's read+decode, then each transform of dataset.transform in turn."""
    base = dataset.base if isinstance(dataset, Resampled) else dataset
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as in a DataLoader worker
    try:
        return _breakdown(base, count)
    finally:
        torch.set_num_threads(threads)


def _breakdown(base, count):
    count = min(count, len(base.samples))
    steps = {"read+decode": 0.0}
    for t in base.transform.transforms:
        steps.setdefault(type(t).__name__, 0.0)
    for k in range(count):
        path, _ = base.samples[(k * 7919) % len(base.samples)]
        t0 = time.perf_counter()
        img = base.loader(path)
        steps["read+decode"] += time.perf_counter() - t0
        for t in base.transform.transforms:
            t0 = time.perf_counter()
            img = t(img)
            steps[type(t).__name__] += time.perf_counter() - t0
    return [(name, 1e3 * s / count) for name, s in steps.items()]


def format_table(rows, gpu_rate=None):
    head = (
        f"{'workers':>7s} {'batches':>7s} {'images/s':>9s} {'ms/batch':>9s} {'core-ms/img':>11s} "
        f"{'cpu-ms/img':>10s} {'img/s/core':>10s} {'1st batch s':>11s}"
    )
    if gpu_rate:
        head += f" {f'cores@{gpu_rate:g}':>11s}"
    lines = [head]
    for r in rows:
        cpu = (
            f"{r['cpu_ms_per_image']:10.2f}" if r["cpu_ms_per_image"] is not None else f"{'-':>10s}"
        )
        line = (
            f"{r['workers']:7d} {r['batches']:7d} {r['images_per_s']:9.1f} {r['ms_per_batch']:9.1f} "
            f"{r['core_ms_per_image']:11.2f} {cpu} {r['images_per_s_per_core']:10.1f} "
            f"{r['first_batch_s']:11.2f}"
        )
        if gpu_rate:
            line += f" {r['cores_for_gpu']:11.1f}"
        lines.append(line)
    return "\n".join(lines)


def parse_workers(text):
    try:
        ws = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--workers wants comma-separated integers, got {text!r}"
        ) from None
    if not ws or any(w < 0 for w in ws):
        raise argparse.ArgumentTypeError(f"--workers wants integers >= 0, got {text!r}")
    return ws


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workers", type=parse_workers, default=None, help="comma-separated, default 0,1,2"
    )
    p.add_argument("--batch", type=int, default=None, help="default 256 (--quick: 8)")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="timed batches per worker count, after the first; default 12 (--quick: 2)",
    )
    p.add_argument(
        "--root", help="a real tree (ROOT/train/<class>/<image>) instead of the synthetic one"
    )
    p.add_argument("--classes", type=int, default=2, help="synthetic tree: classes (default 2)")
    p.add_argument(
        "--per-class", type=int, default=None, help="synthetic tree: images per class (default 200)"
    )
    p.add_argument(
        "--pipeline",
        choices=["auto", "ctmq", "standin"],
        default="auto",
        help="ctmq: ctmq.data.load('imagenet') (needs torchvision); standin: the PIL "
        "re-implementation here; auto: ctmq where torchvision imports",
    )
    p.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=None,
        help="a GPU's training rate to feed: prints the loader cores it needs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny tree, batch 8, 2 batches"
    )
    a = p.parse_args(argv)

    def default(value, quick, full):
        return value if value is not None else (quick if a.quick else full)

    workers = default(a.workers, [0, 1, 2], [0, 1, 2])
    batch = default(a.batch, 8, 256)
    batches = default(a.batches, 2, 12)
    per_class = default(a.per_class, 12, 200)
    if batch < 1 or batches < 1 or per_class < 1 or a.classes < 1:
        p.error("--batch, --batches, --per-class and --classes must be >= 1")
    if a.gpu_images_per_s is not None and not a.gpu_images_per_s > 0:
        p.error("--gpu-images-per-s must be > 0")

    t_start = time.perf_counter()
    tmp = None
    try:
        if a.root:
            root, tree = (
                a.root,
                f"{a.root} (its first read may come from disk, later ones from the page cache)",
            )
        else:
            tmp = root = tempfile.mkdtemp(prefix="ctmq-bench-loader-")
            t0 = time.perf_counter()
            sizes = make_tree(root, a.classes, per_class, seed=a.seed)
            tree = (
                f"synthetic, {a.classes} classes x {per_class} JPEGs 500x375 quality 90, mean "
                f"{np.mean(sizes) / 1e3:.0f} KB (min {min(sizes) / 1e3:.0f}, max {max(sizes) / 1e3:.0f}); "
                f"written in {time.perf_counter() - t0:.1f} s, read from the page cache"
            )
        try:
            data, pipeline = load_pipeline(root, a.pipeline)
        except data_mod.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        pin = torch.cuda.is_available()
        ncores = core_count()
        from PIL import __version__ as pil_version
        from PIL import features

        jpeg = features.version("jpg") or "?"
        turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
        log = bench.JsonRows(
            a.json,
            cpu=cpu_model(),
            cores=ncores,
            load_average=load_average(),
            pipeline=pipeline,
            tree=tree,
            train_images=len(data.train),
            batch=batch,
            pin_memory=pin,
            image_size=data.image_size,
            torch=torch.__version__,
            pillow=pil_version,
            jpeg=f"{turbo} {jpeg}",
            gpu_images_per_s=a.gpu_images_per_s,
        )
        print(
            f"ImageNet training input pipeline, {cpu_model()}, {ncores} cores "
            f"(os.cpu_count {os.cpu_count()}); load average {load_average()}"
        )
        print(f"pipeline: {pipeline}")
        print(
            f"  Pillow {pil_version} ({turbo} {jpeg}), torch {torch.__version__}, "
            f"{data.image_size}x{data.image_size} out, {len(data.train)} train images"
        )
        print(f"data: {tree}")
        print(
            f"loader: ctmq.engine.trainer.make_loaders, batch {batch}, shuffle, drop_last, "
            f"persistent_workers, pin_memory {'on' if pin else 'off'}"
        )
        steps = breakdown(data.train, count=8 if a.quick else 64, seed=a.seed)
        total = sum(ms for _, ms in steps)
        log.meta["breakdown_ms"] = dict(steps)
        print(
            "one image on one core, main process, no DataLoader: "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in steps)
            + f" = {total:.2f} ms ({1e3 / total:.0f} img/s)"
        )
        rows = []
        for w in workers:
            row = measure(data, w, batch, batches, a.seed, pin)
            if a.gpu_images_per_s:
                row["cores_for_gpu"] = a.gpu_images_per_s / row["images_per_s_per_core"]
            rows.append(row)
            log.add(row)
        print(format_table(rows, a.gpu_images_per_s))
        if a.gpu_images_per_s:
            ref = max(rows, key=lambda r: r["workers"])
            need = a.gpu_images_per_s / ref["images_per_s_per_core"]
            print(
                f"to feed {a.gpu_images_per_s:g} images/s: {need:.1f} loader cores at the "
                f"{ref['workers']}-worker row's {ref['images_per_s_per_core']:.0f} img/s per core "
                f"(this machine: {ncores}, which give {ncores * ref['images_per_s_per_core']:.0f} img/s); "
                f"a floor: the training process's own CPU work comes on top"
            )
        print(f"total {time.perf_counter() - t_start:.1f} s")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
