"""One daemon per state directory: an exclusive ``flock`` on ``<state dir>/gpuflops.lock``,
taken before anything in the directory is written and held for the daemon's life.

The kernel releases the lock when the process dies, however it dies, so a stale lock file
never blocks a restart. The holder writes its pid into the file for the next one to name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

LOCK_FILENAME = "gpuflops.lock"


class StateDirLockedError(RuntimeError):
    """Another process holds the state directory; carries its pid when it wrote one."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"state directory {state_dir} is in use by {who} (another gpuflops "
                         f"daemon?); one daemon per state directory: stop it, or use another "
                         f"--state-dir")
        self.pid = pid


class StateDirLock:
    """The held lock; ``release()`` (or process exit) frees it."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LOCK_FILENAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirLockedError(state_dir, holder) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
