"""Memory layouts the ops rely on: dense tensors, strides kept across
backward, and the bit-packed STE masks (1 bit per element, memory order)."""

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """True if t covers exactly numel consecutive elements in some stride order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def dense(t: Tensor) -> Tensor:
    """t if dense, else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()


def rows_dense(w: Tensor) -> Tensor:
    """w dense with each output channel (dim 0) one run of elements
    (contiguous or channels_last both are); otherwise a contiguous copy."""
    if is_dense(w) and (w.dim() < 2 or w.stride(0) * w.shape[0] == w.numel()):
        return w
    return w.contiguous()


def restride(t: Tensor, shape, stride) -> Tensor:
    """t with exactly these strides (a copy only when they differ)."""
    if tuple(t.stride()) == tuple(stride):
        return t
    return torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def flat_memory(t: Tensor) -> Tensor:
    """1-D view of a dense tensor in memory order."""
    return t.as_strided((t.numel(),), (1,))


def mask_bytes(x: Tensor) -> Tensor:
    """An uninitialized packed mask for x: one bit per element."""
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


_SHIFTS = {}


def _shifts(device):
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_mask(mask: Tensor) -> Tensor:
    """bool tensor (dense) -> uint8, bit j of byte i = memory element 8 i + j."""
    flat = flat_memory(mask)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, like: Tensor) -> Tensor:
    """Inverse of pack_mask: a bool tensor with like's shape and strides."""
    bits = ((packed[:, None] >> _shifts(packed.device)) & 1).view(-1)[: like.numel()]
    out = torch.empty_like(like, dtype=torch.bool)
    flat_memory(out).copy_(bits)
    return out
