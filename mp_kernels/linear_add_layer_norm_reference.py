"""PyTorch ``linear_add_layer_norm``: the CPU backend and the tests' oracle, literally ``rows_linear`` then
``add_layer_norm`` then a scatter of the live rows.

Like both of them it computes every row of the buffer (a static shape, no host read of ``n_rows``); the scatter
sends the rows that must not land (dead rows, negative or out-of-range destinations) to one extra trash row, so it
needs no host read either.
"""

from __future__ import annotations

import torch

from mp_kernels.add_layer_norm_reference import add_layer_norm_torch
from mp_kernels.rows_linear_reference import rows_linear_torch


def linear_add_layer_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    n_rows: torch.Tensor,
    *,
    dest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validated inputs as in ``linear_add_layer_norm``; returns ``(capacity, N)`` in ``x``'s dtype.

    Without ``dest`` every row is computed and row ``r`` holds row ``r``'s result. With ``dest`` (int32
    ``(capacity,)``) row ``r < n_rows`` lands in ``dest[r]`` if that lies in ``[0, capacity)``; rows no live row
    lands in are unspecified (``torch.empty``).
    """
    y = add_layer_norm_torch(rows_linear_torch(x, weight, bias, n_rows), residual, norm_weight, norm_bias, eps, n_rows)
    if dest is None:
        return y
    capacity = x.shape[0]
    live = torch.arange(capacity, device=x.device) < n_rows.reshape(1)
    lands = live & (dest >= 0) & (dest < capacity)
    target = torch.where(lands, dest, capacity).long()
    out = torch.empty((capacity + 1, y.shape[1]), dtype=y.dtype, device=y.device)
    out.index_copy_(0, target, y)
    return out[:capacity]
