"""Provenance recorded in every results file: device, driver, library versions, git commit and command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

SOURCE_COMMIT_VARIABLE = "MP_SOURCE_COMMIT"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The GPU's name as ``torch.cuda.get_device_name()`` gives it, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def provenance(device: torch.device | str = "cpu", command: str | None = None) -> dict[str, Any]:
    """A dictionary describing where and how a result was produced.

    ``git_dirty``: tracked files differ from ``git_commit``, other than results files under ``bench/results``
    (benchmarks run one after another rewrite those, which says nothing of the code that produced this one).
    Where the code runs on a copy of the working tree (a lent GPU machine, whose copy of ``.git`` may be older than
    the tree), whoever runs it declares the commit the copy was made from in ``$MP_SOURCE_COMMIT``: it is then
    ``git_commit``, and ``git_dirty`` is None (not known); so is it outside a git checkout (``"unknown"``).
    """
    device = torch.device(device)
    declared = os.environ.get(SOURCE_COMMIT_VARIABLE)
    commit = declared or _git("rev-parse", "HEAD")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import transformers

    record: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "driver": None,
        "git_commit": commit,
        "git_dirty": None
        if declared or commit == "unknown"
        else bool(_git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/results")),
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        try:
            record["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            record["driver"] = "unknown"
    return record


def write_results(path: str | Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write ``{"provenance": meta, "records": records}`` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": meta, "records": records}, indent=2) + "\n")
    return path
