"""Specification of ``mp_model.recipe.locks``: one holder at a time; a second fails at once, naming the first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mp_model.recipe.locks import LockedError, exclusive_lock


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_second_holder_fails_at_once_naming_the_first(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "target"
    if kind == "folder":
        path.mkdir()
    with exclusive_lock(path, f"the {kind}"):
        with pytest.raises(LockedError, match=f"the {kind} is in use by process {os.getpid()}"):
            with exclusive_lock(path, f"the {kind}"):
                pass
    with exclusive_lock(path, f"the {kind}"):  # released when the block ends
        pass


def test_another_process_is_refused_while_the_lock_is_held(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    code = (
        "import sys\nfrom mp_model.recipe.locks import exclusive_lock\n"
        "try:\n    with exclusive_lock(sys.argv[1], 'out'): pass\n"
        "except OSError as error:\n    print(error); sys.exit(3)\n"
    )
    with exclusive_lock(path, "out"):
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and f"out is in use by process {os.getpid()}" in done.stdout
    assert subprocess.run([sys.executable, "-c", code, str(path)], timeout=60).returncode == 0
