"""One writer at a time: ``exclusive_lock`` holds a non-blocking ``flock`` on an output file or a run folder.

A second process that asks for the same lock fails at once with a ``LockedError`` naming the holder's pid (read
from ``/proc/locks`` on Linux). The lock belongs to an open file description, so it ends with the process, however
it ends: no stale lock file is ever left to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockedError(OSError):
    """Another process holds the lock: the message names the path and, where known, the holder's pid."""


def lock_holder(path: Path) -> int | None:
    """The pid of a process holding a ``flock`` on ``path`` (``/proc/locks``), or ``None`` if none is known."""
    try:
        inode = os.stat(path).st_ino
        entries = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        fields = entry.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4]) if fields[4].isdigit() else None
    return None


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a folder, or a file created empty if it does not exist) while the
    ``with`` block runs.

    Raises:
        LockedError: at once, if another process (or another open of ``path`` in this one) holds it; ``what``
            (e.g. ``"--output out.jsonl"``) starts the message.
    """
    path = Path(path)
    flags = os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT
    handle = os.open(path, flags, 0o666)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(path)
            by = f"process {holder}" if holder is not None else "another process"
            raise LockedError(f"{what} is in use by {by}: wait for it to finish, or stop it") from None
        yield
    finally:
        os.close(handle)
