"""``add_layer_norm``: ``LayerNorm(x + residual)`` over the live rows of a fixed-capacity token buffer.

This is the tail of BERT's ``BertSelfOutput`` and ``BertOutput`` after their dense layer (dropout is a no-op at
inference). As with ``rows_linear``, only the first ``n_rows`` rows of the buffer are live and ``n_rows`` stays in
device memory: the Triton kernel reads it and skips the dead rows, the PyTorch backend normalises every row.
Nothing here synchronises with the host, and the only allocation is the output: both backends can be captured in
a CUDA graph.
"""

from __future__ import annotations

import torch

from mp_kernels.add_layer_norm_reference import add_layer_norm_torch
from mp_kernels.checks import check_eps, check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.rows_linear import check_n_rows

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)
MAX_TRITON_FEATURES = 8192


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    n_rows: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.layer_norm(x + residual, (d,), weight, bias, eps)`` on the first ``n_rows`` rows.

    Both backends compute the same function: ``x + residual`` is rounded to the input dtype first (as PyTorch
    adds two half-precision tensors), then the mean and variance (biased, as ``nn.LayerNorm``) are taken in
    float32 (float64 for float64) and the result is rounded to ``x``'s dtype.

    Args:
        x: ``(capacity, d)``, float16, bfloat16 or float32 (float64 on the ``"torch"`` backend), contiguous,
            ``d >= 1`` (at most ``MAX_TRITON_FEATURES`` on the Triton backend); ``capacity`` may be 0.
        residual: ``(capacity, d)``, same dtype and device, contiguous.
        weight: ``(d,)``, the ``nn.LayerNorm`` scale, same dtype and device, contiguous.
        bias: ``(d,)``, the ``nn.LayerNorm`` shift, same dtype and device, contiguous.
        eps: a Python float ``> 0`` added to the variance.
        n_rows: int32 tensor with one element (shape ``(1,)`` or ``()``, e.g. ``cu_seqlens[-1:]``) on ``x``'s
            device: how many leading rows are live. Never read on the host. Meant to lie in ``[0, capacity]``;
            the Triton kernel clamps it into that range.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``(capacity, d)`` in ``x``'s dtype. Rows ``< n_rows`` hold the result; rows ``>= n_rows`` are
        unspecified: the Triton backend never writes them, the PyTorch backend normalises the dead rows too.
    """
    check_tensor("x", x, ndim=2, dtypes=TORCH_DTYPES)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one feature column (d >= 1), got shape (capacity, 0)")
    check_tensor("residual", residual, ndim=2, device=x.device)
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        check_tensor(name, tensor, ndim=1, device=x.device)
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
        if tensor.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got {tuple(tensor.shape)}")
    eps = check_eps(eps)
    check_n_rows(n_rows, x.device)
    chosen = choose_backend(backend, x.device)
    if chosen == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32 on the triton backend, got {x.dtype}")
        if x.shape[1] > MAX_TRITON_FEATURES:
            raise ValueError(f"x has {x.shape[1]} features, more than the triton backend's {MAX_TRITON_FEATURES}")
        from mp_kernels._triton.add_layer_norm import add_layer_norm_triton

        return add_layer_norm_triton(x, residual, weight, bias, eps, n_rows)
    return add_layer_norm_torch(x, residual, weight, bias, eps, n_rows)
