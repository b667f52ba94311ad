"""File writing that never leaves a half-written file: temp file + rename."""

import contextlib
import glob
import os
import tempfile

__all__ = ["atomic_open", "stale_temp_files", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"


def _umask():
    """The process's umask: from /proc on Linux (reading it there changes
    nothing), else by setting it and putting it back."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temp file beside `path`; it replaces `path` only if the block ends
    without an exception (os.replace is atomic on one file system). The file
    gets the mode a plain open() would give it (0666 less the umask), not the
    temp file's 0600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def stale_temp_files(folder):
    """atomic_open's temp files left in `folder` by a process killed mid-write."""
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(folder)), "*.*" + TEMP_SUFFIX)))
