"""Faults for tests: a FileLog OS seam that fails on demand, and a real small tmpfs when allowed.

``FaultyOS`` stands in for the ``os`` module at the log writer's OS calls (``write``, ``fsync``,
``ftruncate``): it is handed to the ``FileLog`` (``inject``), never patched into ``os`` itself.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class FaultyOS:
    """Real OS calls until a test arms an errno for ``write`` or ``fsync``."""

    def __init__(self) -> None:
        self.write_errno: int | None = None
        self.fsync_errno: int | None = None
        #: Bytes the next failing write lets through before it fails (a torn batch).
        self.partial = 0
        self.failed = {"write": 0, "fsync": 0}
        self.lock = threading.Lock()

    def write(self, fd: int, data: Any) -> int:
        code = self.write_errno
        if code is not None:
            if self.partial:
                part, self.partial = self.partial, 0
                return os.write(fd, data[:part])
            with self.lock:
                self.failed["write"] += 1
            raise OSError(code, os.strerror(code))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        code = self.fsync_errno
        if code is not None:
            with self.lock:
                self.failed["fsync"] += 1
            raise OSError(code, os.strerror(code))
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def clear(self) -> None:
        self.write_errno = self.fsync_errno = None


def inject(store: Any, seam: FaultyOS) -> FaultyOS:
    """Route the store's log writer through ``seam``."""
    store._rt.log._os = seam
    return seam


@contextmanager
def small_tmpfs(directory: Path, size: str = "2m") -> Iterator[bool]:
    """Mount a real tmpfs of ``size`` on ``directory`` (True), or leave it a plain directory (False)
    when mounting is not permitted (or SESSION_ENGINE_TEST_NO_MOUNT is set); the caller then injects
    ENOSPC through the seam instead."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.environ.get("SESSION_ENGINE_TEST_NO_MOUNT"):  # exercise the fallback where mount works
        yield False
        return
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                              capture_output=True, check=False, timeout=10)
        mounted = done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False, timeout=10)


ENOSPC = errno.ENOSPC
EIO = errno.EIO
