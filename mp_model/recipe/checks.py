"""Checks of the application's knobs, each a ``ValueError`` naming the knob: counts, numbers and devices."""

from __future__ import annotations

import math

import torch


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``; a ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    name: str, value: object, minimum: float | None = None, maximum: float | None = None, *, positive: bool = False
) -> float:
    """``float(value)`` if it is a finite number within ``[minimum, maximum]`` (and > 0 with ``positive``); a
    ``ValueError`` naming ``name`` otherwise (NaN and infinities included)."""
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    limits = ["> 0"] if positive else []
    limits += [f">= {minimum}"] if minimum is not None else []
    limits += [f"<= {maximum}"] if maximum is not None else []
    inside = (minimum is None or number >= minimum) and (maximum is None or number <= maximum)
    if not math.isfinite(number) or not inside or (positive and number <= 0):
        raise ValueError(f"{name} must be a finite number {', '.join(limits)}".rstrip() + f", got {value!r}")
    return number


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it: ``cpu``, or ``cuda``/``cuda:N`` with CUDA present.

    Raises:
        ValueError: naming the device, for a string torch does not parse, another device type, or CUDA (or a CUDA
            index) that this machine lacks.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {str(device)!r} is not a torch device: use cpu, cuda or cuda:N") from error
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed
