"""Files written with the process's normal permissions: what a new file gets under the umask."""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode() -> int:
    """The mode a new file gets under this process's umask (``0o666`` less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(folder: str | os.PathLike[str]) -> None:
    """Give every file directly in ``folder`` the process's normal mode (``umask_mode``): ``save_pretrained``
    writes the weights through a private temporary file (mode 0600) that another account could not read."""
    mode = umask_mode()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
