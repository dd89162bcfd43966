"""PyTorch ``rows_linear``: the CPU backend, the tests' oracle and the "compute everything" baseline.

It runs ``F.linear`` and the activation over all ``capacity`` rows, live or not: a static shape that needs no
host read of ``n_rows``, at the price of the wasted work on dead rows that the Triton kernel skips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "tanh")


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation`` (None or one of ``ACTIVATIONS``) of ``y``, in place where PyTorch has an in-place form."""
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return y.relu_()
    return y.tanh_()


def rows_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_rows: torch.Tensor,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """Validated inputs as in ``rows_linear``; returns ``(capacity, N)`` in ``x``'s dtype, every row computed.

    ``n_rows`` is not read: the dead rows are computed too. The product runs in ``x``'s dtype as PyTorch runs
    ``nn.Linear`` (float32 accumulation inside the matmul for half precision), and so does the activation.
    """
    return apply_activation(F.linear(x, weight, bias), activation)
