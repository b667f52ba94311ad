"""Stage checkpoints: one safetensors file of the model's state dict, with the
stage and the caller's metadata as JSON under the metadata key "ctmq", and a
sha256 of the tensor data, so that a truncated or damaged file is found
before its weights are used.

Reading never unpickles. Every error names the file (CheckpointError).
"""

import hashlib
import json
import os
import struct

from ..files import atomic_open
from ..nn import quantized_layers, set_bits

METADATA_KEY = "ctmq"
DIGEST_KEY = "ctmq.sha256"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or fails its check; names the file."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(path, model, meta):
    """Write model's state dict and `meta` (JSON-able) to `path`, all or nothing."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # the digest covers the tensor data, which the header's metadata does not
    # change: serialize once to hash it, once more with the digest in the header
    blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    data = blob[8 + struct.unpack("<Q", blob[:8])[0] :]
    blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta), DIGEST_KEY: _digest(data)})
    with atomic_open(path, "wb") as f:
        f.write(blob)


def _read(path, header_only=False):
    """(header dict, whole file bytes or None, tensor data bytes or None) of a
    safetensors file, checked for size; with header_only, only the header is
    read (its size checked against the file's)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if header_only:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                blob = head + f.read(min(n, max(size - 8, 0)))
            else:
                blob = f.read()
                size = len(blob)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    if size < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes): not a checkpoint")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > size - 8:
        raise CheckpointError(
            f"{path}: truncated: its header claims {n} bytes, the file has {size - 8}"
        )
    try:
        header = json.loads(blob[8 : 8 + n])
        if not isinstance(header, dict):
            raise TypeError("not an object")
        ends = [
            int(v.get("data_offsets", [0, 0])[1])
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)
        ]
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable header (not a safetensors checkpoint)") from e
    if ends and max(ends) != size - 8 - n:
        raise CheckpointError(
            f"{path}: truncated or padded: its tensors need {max(ends)} bytes, "
            f"the file holds {size - 8 - n}"
        )
    if header_only:
        return header, None, None
    return header, blob, blob[8 + n :]


def _meta(path, header):
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY, "{}")
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.fspath(path)}: its ctmq metadata is not JSON") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{os.fspath(path)}: its ctmq metadata is not an object")
    return meta


def checkpoint_meta(path):
    """The ctmq metadata of a checkpoint (stage, schedule, key, the caller's),
    from its header alone."""
    header, _, _ = _read(path, header_only=True)
    return _meta(path, header)


def _verified(path):
    """(header, whole file bytes) read once, its sha256 checked (where it has one)."""
    header, blob, data = _read(path)
    digest = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if digest is not None and digest != _digest(data):
        raise CheckpointError(
            f"{os.fspath(path)}: checksum mismatch: the file was changed or damaged"
        )
    return header, blob


def verify_checkpoint(path):
    """Read the whole file and check its sha256 (where it has one); returns the
    metadata. A CheckpointError names the file and says what is wrong."""
    header, _ = _verified(path)
    return _meta(path, header)


def load_checkpoint(path, model=None):
    """(state dict, metadata) of a stage checkpoint, verified; loads it into
    model if given, and sets the model's bit depths to the stage's. The file
    is read once: the bytes checked are the bytes loaded."""
    from safetensors.torch import load

    path = os.fspath(path)
    header, blob = _verified(path)
    meta = _meta(path, header)
    try:
        state = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupt tensor data ({e})") from e
    if model is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: does not fit this model ({e})") from e
        stage = meta.get("stage")
        if stage and quantized_layers(model):
            set_bits(model, stage["w_bits"], stage["a_bits"])
    return state, meta
