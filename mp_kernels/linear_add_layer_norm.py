"""``linear_add_layer_norm``: ``LayerNorm(x @ W.T + b + residual)`` over the live rows of a token buffer, in one
launch, each row stored at its destination.

This is BERT's ``BertSelfOutput`` and ``BertOutput`` (dense layer, dropout a no-op at inference, residual add and
LayerNorm) fused: the same function as ``rows_linear`` followed by ``add_layer_norm``, whose two roundings it
keeps, with an optional scatter of the output rows (``dest``) so that a compaction can ride on the store. As
there, only the first ``n_rows`` rows of the buffer are live and ``n_rows`` stays in device memory. Nothing here
synchronises with the host: both backends can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from mp_kernels.checks import check_eps, check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.linear_add_layer_norm_reference import linear_add_layer_norm_torch
from mp_kernels.rows_linear import check_n_rows

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)
MAX_TRITON_FEATURES = 1024


def _check_vector(name: str, tensor: object, n: int, like: torch.Tensor) -> None:
    check_tensor(name, tensor, ndim=1, device=like.device)
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {tensor.dtype}")
    if tensor.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(tensor.shape)}")


def linear_add_layer_norm(
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
    backend: str | None = None,
) -> torch.Tensor:
    """``F.layer_norm(round(round(x @ weight.T + bias) + residual))`` on the first ``n_rows`` rows, scattered.

    For each live row ``r``: ``v = x[r] @ weight.T + bias`` accumulated in float32 and rounded to the dtype (as
    ``rows_linear``), ``s = v + residual[r]`` rounded to the dtype, then the LayerNorm of ``s`` with float32 mean
    and biased variance (float64 for float64), ``norm_weight`` and ``norm_bias``, rounded to the dtype (as
    ``add_layer_norm``). The PyTorch backend is literally ``rows_linear`` then ``add_layer_norm`` then the scatter.

    Args:
        x: ``(capacity, K)``, float16, bfloat16 or float32 (float64 on the ``"torch"`` backend), contiguous,
            ``K >= 1``; ``capacity`` may be 0.
        weight: ``(N, K)`` as ``nn.Linear.weight``, ``N >= 1`` (at most ``MAX_TRITON_FEATURES`` on the Triton
            backend), same dtype and device as ``x``, contiguous.
        bias: ``(N,)``, same dtype and device, contiguous.
        residual: ``(capacity, N)``, same dtype and device, contiguous.
        norm_weight: ``(N,)``, the ``nn.LayerNorm`` scale, same dtype and device, contiguous.
        norm_bias: ``(N,)``, the ``nn.LayerNorm`` shift, same dtype and device, contiguous.
        eps: a Python float ``> 0`` added to the variance.
        n_rows: int32 tensor with one element (shape ``(1,)`` or ``()``) on ``x``'s device: how many leading rows
            are live. Never read on the host; clamped into ``[0, capacity]``.
        dest: None (row ``r`` goes to row ``r``) or int32 ``(capacity,)`` on ``x``'s device, contiguous: live row
            ``r`` goes to row ``dest[r]``, and is dropped if ``dest[r]`` lies outside ``[0, capacity)`` (e.g. -1).
            Entries of dead rows are never read. If two live rows share a destination, which one lands is
            unspecified.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``y`` ``(capacity, N)`` in ``x``'s dtype, a new tensor. Rows that a live row lands in hold its result;
        the others are unspecified (without ``dest`` the PyTorch backend computes the dead rows too).
    """
    check_tensor("x", x, ndim=2, dtypes=TORCH_DTYPES)
    capacity, k = x.shape
    if k == 0:
        raise ValueError("x must have at least one feature column (K >= 1), got shape (capacity, 0)")
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape (N >= 1, K={k}), got {tuple(weight.shape)}")
    n = weight.shape[0]
    _check_vector("bias", bias, n, x)
    check_tensor("residual", residual, ndim=2, device=x.device)
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if residual.shape != (capacity, n):
        raise ValueError(f"residual must have shape ({capacity}, {n}), got {tuple(residual.shape)}")
    _check_vector("norm_weight", norm_weight, n, x)
    _check_vector("norm_bias", norm_bias, n, x)
    eps = check_eps(eps)
    check_n_rows(n_rows, x.device)
    if dest is not None:
        check_tensor("dest", dest, ndim=1, dtypes=(torch.int32,), device=x.device)
        if dest.shape[0] != capacity:
            raise ValueError(f"dest must have shape ({capacity},), got {tuple(dest.shape)}")
    chosen = choose_backend(backend, x.device)
    if chosen == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32 on the triton backend, got {x.dtype}")
        if n > MAX_TRITON_FEATURES:
            raise ValueError(f"weight has {n} output features, more than the triton backend's {MAX_TRITON_FEATURES}")
        from mp_kernels._triton.linear_add_layer_norm import linear_add_layer_norm_triton

        return linear_add_layer_norm_triton(x, weight, bias, residual, norm_weight, norm_bias, eps, n_rows, dest=dest)
    return linear_add_layer_norm_torch(x, weight, bias, residual, norm_weight, norm_bias, eps, n_rows, dest=dest)
