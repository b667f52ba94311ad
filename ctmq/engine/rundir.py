"""The run directory of ctmq.engine.fit, made trustworthy:

    out/.lock         held (flock) by the one process training in `out`
    out/config.json   what is trained; checked on resume
    out/model.json    the model's structure (module types, tensor shapes);
                      its sha256 is config.json's "model_fingerprint"

A resumed run must be the same run: the same configuration and the same
model (a layer added, removed or resized in the user's code is a different
model). A mismatch is a RunConfigError naming what differs and saying to use
another directory or --restart. Temp files of a process killed mid-write are
removed under the lock.
"""

import contextlib
import hashlib
import json
import os
import shutil

from torch import nn

from ..files import atomic_open, stale_temp_files

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None


class RunConfigError(ValueError):
    """A bad configuration, or one that differs from the run directory's."""


def model_structure(model):
    """{"modules": [[name, type]], "tensors": [[name, shape, dtype]]} of a
    model: what a checkpoint of it needs to fit (names and shapes), and the
    layer types, so that swapping a layer counts too."""

    def kind(m):  # SyncBatchNorm (--sync-bn) is the same layer as the BatchNorm it replaces
        return "BatchNorm2d" if isinstance(m, nn.SyncBatchNorm) else type(m).__name__

    return {
        "modules": [[name, kind(m)] for name, m in model.named_modules() if name],
        "tensors": [
            [k, list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in model.state_dict().items()
        ],
    }


def fingerprint(structure):
    return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(old, new):
    """One line saying where two model structures first differ."""
    for part in ("modules", "tensors"):
        a = {e[0]: e[1:] for e in old.get(part, [])}
        b = {e[0]: e[1:] for e in new.get(part, [])}
        for name in [*b, *(n for n in a if n not in b)]:  # in the model's order
            if name not in b:
                return f"{name} is gone"
            if name not in a:
                return f"{name} is new"
            if a[name] != b[name]:
                return f"{name} was {' '.join(map(str, a[name]))}, is {' '.join(map(str, b[name]))}"
    return "the module order changed"


class RunLock:
    """An exclusive lock on a run directory for the life of a training call,
    so that two processes never interleave their writes in one directory."""

    def __init__(self, out):
        self.path = os.path.join(out, ".lock")
        self.file = None

    def acquire(self):
        if fcntl is None:
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            self.file = None
            raise RunConfigError(
                f"{os.path.dirname(self.path)} is in use by another ctmq process "
                f"(pid {holder}); wait for it to finish, or use another --out"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def release(self):
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_out_dir(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunConfigError(
            f"out {out} is a file; expected a run directory (a new or existing folder)"
        )


def remove_stale_temps(out):
    """Remove atomic_open's temp files left by a killed process (call under the lock)."""
    for folder in (out, os.path.join(out, "stages")):
        for path in stale_temp_files(folder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunConfigError(
            f"{path} is unreadable ({e}); use another --out, or --restart to discard the run"
        ) from e


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1)


def prepare(out, config, restart, structure=None, defaults=None):
    """Create `out`, or check that the run it holds was made with `config` (a
    JSON-able dict; keys missing from an older config.json take their value
    from `defaults`) and a model of `structure` (model_structure()); with
    restart, discard its stages instead. Call under the lock (rank 0)."""
    path = os.path.join(out, "config.json")
    config = json.loads(json.dumps(config))
    if structure is not None:
        config["model_fingerprint"] = fingerprint(structure)
    if os.path.exists(path) and not restart:
        old = _read_json(path)
        if not isinstance(old, dict):
            raise RunConfigError(f"{path} is not a configuration; use another --out, or --restart")
        old = {**{k: v for k, v in (defaults or {}).items() if k not in old}, **old}
        old.setdefault(
            "model_fingerprint", config.get("model_fingerprint")
        )  # made before fingerprints
        if old.get("model_fingerprint") != config.get("model_fingerprint"):
            before = os.path.join(out, "model.json")
            where = (
                _first_difference(_read_json(before), structure)
                if os.path.exists(before)
                else "its layers or tensor shapes differ"
            )
            raise RunConfigError(
                f"{out} holds a run of another model ({where}); use another "
                "--out, or --restart to discard that run"
            )
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise RunConfigError(
                f"{out} holds a run with another configuration ({details}); "
                "use another --out, or --restart to discard it"
            )
    if restart:  # the old run's stages and reports
        shutil.rmtree(os.path.join(out, "stages"), ignore_errors=True)
        for name in ("report.json", "report.csv", "report.png", "model.json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, name))
    os.makedirs(os.path.join(out, "stages"), exist_ok=True)
    if structure is not None:
        write_json(os.path.join(out, "model.json"), structure)
    write_json(path, config)
