"""Training and evaluation of one stage, on one process or under torchrun (DDP)."""

import contextlib
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..nn import quantized_layers, set_bits
from .config import TrainConfig  # noqa: F401  (re-exported: ctmq.engine.trainer.TrainConfig)

_CHECK_EVERY = 16  # steps between finiteness checks of the loss on CUDA (one sync)


class StageDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the stage and the step."""


# ------------------------------------------------------------------ processes
@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()


def init_distributed(device_type):
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":  # before NCCL starts: its communicator binds to this device
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def make_loaders(data, batch_size, info, seed, workers=0, pin_memory=False):
    """(train, test) loaders; under DDP each rank reads its DistributedSampler
    shard. Workers are started anew each epoch (not persistent), so that
    their random seeds come from the loader's generator, which each stage
    seeds (fit's seed_stage): a resumed stage augments as an uninterrupted
    one does. pin_memory for CUDA (asynchronous host-to-device copies)."""
    sampler = None
    if info.enabled:
        sampler = torch.utils.data.DistributedSampler(
            data.train, info.world_size, info.rank, shuffle=True, seed=seed
        )
    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(
        data.train,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=g,
        num_workers=workers,
        drop_last=len(data.train) > batch_size * info.world_size,
        pin_memory=pin_memory,
    )
    test = torch.utils.data.DataLoader(
        data.test,
        batch_size=max(batch_size, 256),
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
    )
    return train, test


# ---------------------------------------------------------------- one stage
def param_groups(model, cfg):
    """The optimizer's parameter groups: with weight_decay_binary=False, the
    latent weights of the layers quantized at this stage (w_bits < 32) get
    no weight decay (decay pulls them to zero, where their signs flip)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay_binary or cfg.weight_decay == 0:
        return [{"params": params}]
    binary = {id(m.weight) for m in quantized_layers(model) if m.w_bits < 32}
    if not binary:  # an FP stage
        return [{"params": params}]
    return [
        {"params": [p for p in params if id(p) not in binary]},
        {"params": [p for p in params if id(p) in binary], "weight_decay": 0.0},
    ]


def _optimizer(model, cfg):
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step, total, warmup, schedule):
    """The LR multiplier at `step` of `total`: a linear warm-up over `warmup`
    steps, then cosine or linear decay to zero over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distillation_loss(student_logits, teacher_logits, temperature=1.0):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), the batch mean
    (Hinton et al.): zero where the two agree; the teacher's logits are
    detached, so the gradient reaches the student only."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * (t * t)


def _autocast(device, cfg):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x, y, device, cfg):
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


class _Progress:
    """Progress of one stage: tqdm bars on a terminal; elsewhere (a log file,
    CI, nohup) one line per epoch, and one a minute within a long epoch, with
    the loss, training accuracy, images/s and the stage's remaining time."""

    INTERVAL = 60.0  # seconds between lines within an epoch

    def __init__(self, label, epochs, steps, enabled, log):
        self.label, self.epochs, self.steps = label, epochs, steps
        self.log = log if enabled else None
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.time()
        self.last_line = self.t0
        self.images = 0

    def bar(self, loader, epoch):
        return _tqdm()(
            loader,
            desc=f"{self.label} epoch {epoch + 1}/{self.epochs}",
            leave=False,
            disable=not self.tty,
            dynamic_ncols=True,
        )

    def line(self, epoch, step, loss, correct, seen_images, epoch_done):
        """step: steps of this stage done; loss: mean so far in the epoch."""
        if self.log is None or self.tty:
            return
        now = time.time()
        if not epoch_done and now - self.last_line < self.INTERVAL:
            return
        self.last_line = now
        rate = self.images / max(now - self.t0, 1e-9)
        left = (now - self.t0) / max(step, 1) * (self.steps - step)
        where = f"epoch {epoch + 1}/{self.epochs}" + (
            ""
            if epoch_done
            else f" step {step - epoch * (self.steps // self.epochs)}/{self.steps // self.epochs}"
        )
        self.log(
            f"{self.label} {where}: loss {loss:.4f}, train top-1 "
            f"{100.0 * correct / max(seen_images, 1):.2f}%, {rate:.0f} img/s, "
            f"stage ETA {_clock(left)}"
        )


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_stage(
    model,
    stage,
    label,
    loaders,
    cfg,
    device,
    info,
    augment=None,
    forward=None,
    teacher=None,
    log=print,
):
    """Train `model` (already at the stage's weights) for stage.epochs with a
    fresh optimizer and cfg's LR schedule; `forward` is the (DDP/compiled)
    callable; `augment`: a function of each training batch (on the device);
    `teacher`: a frozen model whose logits the loss also follows
    (cfg.distill_weight * distillation_loss); `log`: where progress lines go
    when stderr is not a terminal (cfg.progress). Returns {"train_loss": mean
    loss of the last epoch, "seconds": wall time}."""
    base = model.module if hasattr(model, "module") else model
    set_bits(base, stage.w_bits, stage.a_bits)
    forward = forward or model
    train_loader, _ = loaders
    opt = _optimizer(model, cfg)
    total = max(1, stage.epochs * len(train_loader))
    warmup = min(total, round(cfg.warmup_epochs * len(train_loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.lr_schedule)
    )
    progress = _Progress(label, stage.epochs, total, cfg.progress and info.is_main, log)
    t0 = time.time()
    step = 0
    last_loss = float("nan")
    model.train()
    for epoch in range(stage.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        bar = progress.bar(train_loader, epoch)
        running = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        window = []
        seen = images = 0
        for x, y in bar:
            x, y = _to_device(x, y, device, cfg)
            if augment is not None:
                x = augment(x)
            with _autocast(device, cfg):
                logits = forward(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = loss + cfg.distill_weight * distillation_loss(
                        logits, target, cfg.distill_temperature
                    )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += 1
            images += len(y)
            progress.images += len(y)
            running += loss.detach().float()
            correct += (logits.detach().argmax(1) == y).sum()
            window.append(loss.detach().float())
            if device.type != "cuda" or len(window) == _CHECK_EVERY:
                _check_finite(window, step, label)
                window = []
                mean = running.item() / seen
                bar.set_postfix(loss=f"{mean:.4f}")
                progress.line(epoch, step, mean, correct.item(), images, epoch_done=False)
        if window:
            _check_finite(window, step, label)
        if info.enabled:
            dist.all_reduce(running)
            running /= info.world_size
        last_loss = running.item() / max(seen, 1)
        progress.line(epoch, step, last_loss, correct.item(), images, epoch_done=True)
    if info.enabled:
        # Each rank's last forward updated its own BN statistics: take rank 0's,
        # which its checkpoint holds, so that every rank goes on from the same state.
        for buf in base.buffers():
            dist.broadcast(buf, 0)
    return {"train_loss": last_loss, "seconds": time.time() - t0}


def _check_finite(window, step, label):
    losses = torch.stack(window).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        at = step - len(window) + 1 + int(bad[0])
        raise StageDiverged(
            f"stage {label}: loss is {losses[int(bad[0])].item()} at step {at}; "
            "lower --lr or check the data"
        )


@torch.no_grad()
def evaluate(model, loader, device, cfg):
    """(top1, top5) in percent on the loader's full set (every rank sees all of it)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    for x, y in loader:
        x, y = _to_device(x, y, device, cfg)
        with _autocast(device, cfg):
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        n += len(y)
    model.train(was_training)
    return 100.0 * correct1 / max(n, 1), 100.0 * correct5 / max(n, 1)


def _tqdm():
    """tqdm, imported when training starts (a training extra: `import ctmq.engine`
    and `ctmq infer` work without it)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError("training needs tqdm: pip install 'ctmq[train]'") from e
    return tqdm
