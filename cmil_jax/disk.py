"""Writing files when the disk may fill up.

Every file a run or predict writes goes through these helpers (or, for checkpoints, through
``checkpoint.py``, which converts orbax's errors the same way), so that a full disk (ENOSPC) or
an exceeded quota (EDQUOT) gives ``DiskFullError`` naming the file, never a half-written file
in place of a good one:

append_line   one line appended to a log (metrics.jsonl, bad_records.jsonl, ...) in one write;
              when the disk fills part way through, the file is cut back to its previous size,
              so it never ends in a partial line.
write_atomic  a whole file (config.json, predict's records, PNGs, results.md) written beside its
              final name and renamed over it when complete: the previous version stays until
              the new one is whole, and a failed write leaves nothing behind.
save_figure   a matplotlib figure written with write_atomic.
writing       a context manager that turns a full-disk error raised inside it (an OSError, or
              a library's error that carries one in its message, as tensorstore's do) into
              DiskFullError naming what was being written.
The command lines exit with status 4 on DiskFullError (cmil_jax.main, cmil_jax.predict).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads in the messages of libraries that do not raise OSError (tensorstore,
# and orbax passing its errors on, say "... No space left on device [os_error_code='28']").
_DISK_FULL_TEXT = tuple(os.strerror(e) for e in DISK_FULL_ERRNOS) + tuple(
    f"os_error_code='{e}'" for e in DISK_FULL_ERRNOS)


class DiskFullError(OSError):
    """Out of disk space (or over quota) while writing; the message names the file and what
    was kept. errno is ENOSPC."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(error: BaseException | None) -> bool:
    """True when `error`, or an exception it was raised from or while handling, reports a full
    disk or an exceeded quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def writing(what: str, kept: str = ""):
    """Raises DiskFullError('out of disk space writing <what> (<reason>)[; <kept>]') in place of
    a full-disk error raised inside the block; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # pylint: disable=broad-except  (libraries wrap OSError their way)
        if not is_disk_full(e):
            raise
        raise DiskFullError(f"out of disk space writing {what} ({_reason(e)})"
                            + (f"; {kept}" if kept else "")) from e


def append_line(path: str, line: str) -> None:
    """Appends `line` and a newline to `path` (created if missing) with one write, all or
    nothing: when the write fails part way (a full disk), the file is cut back to its previous
    size before the error (DiskFullError naming the file) is raised."""
    data = memoryview((line.rstrip("\n") + "\n").encode())
    with writing(path, "the lines written before are intact"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:  # a regular file takes it in one write unless the disk fills
                    data = data[os.write(fd, data):]
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` whole or not at all: into a temporary file beside it, renamed
    over `path` when complete. On failure the temporary file is removed and the previous
    `path`, if any, is kept (DiskFullError naming `path` when the disk is full)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, "its previous version, if any, is intact"):
        try:
            with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def save_figure(fig, path: str, **kwargs) -> str:
    """fig.savefig into memory, then write_atomic to `path` (directories created)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1].lstrip(".") or "png", **kwargs)
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path
