"""An exclusive lock held on a file, between processes of a host or of hosts sharing a file system.

``flock`` on a lock file that stays where it is (removing it could let two processes lock two
different files of one name). On a network file system Linux implements ``flock`` with whole-file
POSIX locks (NFSv4, or v3 with lockd); a file system without locks (Lustre mounted without
``-o flock``) answers ENOLCK, EOPNOTSUPP, ENOSYS or EINVAL, and then the holder runs unlocked.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_POLL_SECONDS = 0.2
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _take(fd: int, lock_path: Path, waiting_for: str, timeout: float | None, progress: bool) -> bool:
    """Takes the exclusive lock on ``fd`` (waiting while another process holds it, at most ``timeout``
    seconds); False where the file system cannot lock."""
    start, told = time.monotonic(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno in _UNSUPPORTED:
                return False
            raise
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {waiting_for} (it holds {lock_path} locked)")
        if progress and not told:
            print(f"waiting for {waiting_for} (it holds {lock_path} locked)", file=sys.stderr, flush=True)
            told = True
        time.sleep(_POLL_SECONDS)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, waiting_for: str, timeout: float | None = None,
                   progress: bool = False) -> Iterator[bool]:
    """Holds ``lock_path`` (created if missing) locked for the ``with`` block; yields whether it is
    locked (False: the file system cannot lock). While another process holds it, waits (at most
    ``timeout`` seconds, then ``TimeoutError``), saying so on stderr with ``progress``;
    ``waiting_for`` names the holder in those messages ("another process writing ...").

    The lock is released explicitly on leaving: processes forked inside the block share the open
    file, so closing it alone would leave it held until they exit."""
    lock_path = Path(lock_path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = _take(fd, lock_path, waiting_for, timeout, progress)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
