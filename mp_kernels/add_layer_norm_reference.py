"""PyTorch ``add_layer_norm``: the CPU backend, the tests' oracle and the "compute everything" baseline.

It normalises all ``capacity`` rows, live or not: a static shape that needs no host read of ``n_rows``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm_torch(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    n_rows: torch.Tensor,
) -> torch.Tensor:
    """Validated inputs as in ``add_layer_norm``; returns ``(capacity, d)`` in ``x``'s dtype, every row computed.

    ``x + residual`` is added, and rounded, in the input dtype as PyTorch's ``BertSelfOutput`` does; the layer
    norm then computes its statistics in float32 (float64 for float64). ``n_rows`` is not read.
    """
    return F.layer_norm(x + residual, (x.shape[1],), weight, bias, eps)
