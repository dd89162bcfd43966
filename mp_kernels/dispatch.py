"""Backend choice shared by every public kernel: Triton for CUDA tensors or under the interpreter, else PyTorch."""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")


def triton_interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(backend: str | None, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``None`` picks Triton on CUDA devices, or on the CPU when ``TRITON_INTERPRET=1``, and the PyTorch reference
    otherwise. ``"triton"`` on a CPU tensor without the interpreter is an error: there is no CPU Triton target.
    """
    if backend is None:
        return "triton" if device.type == "cuda" or triton_interpreting() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    return backend
