"""What the ``mp`` subcommands share: flag types, output checks, model label names, a quiet ``transformers``."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def quiet_transformers() -> None:
    from transformers import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the command (checked and set by ``use_threads``)."""
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads to ``--threads`` (``None``: torch's default); a count < 1 is a ``ValueError``."""
    if threads is None:
        return
    import torch

    from mp_model.recipe.checks import check_int

    torch.set_num_threads(check_int("--threads", threads))


def optional_int(text: str) -> int | None:
    """An integer >= 0, or ``all``/``none`` for no limit."""
    if text.lower() in ("all", "none"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {text}")
    return value


def threshold_scale(text: str) -> float | None:
    """A threshold scale given on the command line: a positive number, or ``none`` (no pruning)."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a threshold scale must be a positive number or 'none', got {text!r}")
    return value


def model_labels(model: Any) -> list[str]:
    """A model's class names in id order (its ``id2label``)."""
    return [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]


def check_output(option: str, output: Path | None, inputs: Sequence[Path] = ()) -> None:
    """Refuse, before any work, an output that is a folder, lies in a missing folder, or is one of ``inputs``."""
    if output is None:
        return
    if output.is_dir():
        raise ValueError(f"{option} {output} is a directory")
    if not output.parent.is_dir():
        raise ValueError(f"{option} {output}: the folder {output.parent} does not exist")
    for source in inputs:
        if output.resolve() == source.resolve() or (output.exists() and os.path.samefile(output, source)):
            raise ValueError(f"{option} {output} is the input file: refusing to overwrite it")
