"""``rows_linear``: a dense layer over the live rows of a fixed-capacity token buffer, ``act(x @ weight.T + bias)``.

An inference engine that captures its forward pass in a CUDA graph per (batch, width) bucket keeps the packed
tokens in a buffer of ``capacity`` rows of which only the first ``n_rows`` are live; ``n_rows`` is an int32 in
device memory that the host never reads. The Triton backend reads it inside the kernel and its programs whose
row block starts at or after ``n_rows`` return at once, so pruned tokens really save time; the PyTorch backend
computes every row (a static shape, no host read), which is the "compute everything" alternative.

On the Triton backend each shape follows a plan (``mp_kernels._triton.rows_linear.plan_rows_linear``, fixed per
shape and device): tile sizes, and a split of ``K`` over several programs per output tile (summed in a fixed
order, so deterministic) when the tiles alone would leave SMs idle, or, where the measured table says cuBLAS is
faster for the shape on this device, ``F.linear`` over the whole capacity (the PyTorch backend).

Nothing here synchronises with the host, and the only allocations are the output and a split's workspace: both
backends can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from mp_kernels.checks import check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.rows_linear_reference import ACTIVATIONS, rows_linear_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)


def check_n_rows(n_rows: object, device: torch.device) -> torch.Tensor:
    """Check a live-row count: a 1-element int32 tensor on ``device`` (shape ``(1,)`` or ``()``; any view).

    Only the metadata is checked; the value stays on the device.
    """
    check_tensor("n_rows", n_rows, dtypes=(torch.int32,), device=device, contiguous=False)
    if n_rows.dim() > 1 or n_rows.numel() != 1:
        raise ValueError(f"n_rows must hold exactly one value (shape (1,) or ()), got shape {tuple(n_rows.shape)}")
    return n_rows


def check_activation(activation: object) -> str | None:
    """Check that ``activation`` is None or one of ``ACTIVATIONS``."""
    if activation is None:
        return None
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None or a string, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    return activation


def rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_rows: torch.Tensor,
    *,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` on the first ``n_rows`` rows of ``x``, like ``nn.Linear`` plus an activation.

    Args:
        x: ``(capacity, K)``, float16, bfloat16 or float32 (float64 on the ``"torch"`` backend), contiguous,
            ``K >= 1``; ``capacity`` may be 0.
        weight: ``(N, K)`` as ``nn.Linear.weight``, ``N >= 1``, same dtype and device as ``x``, contiguous.
        bias: ``(N,)``, same dtype and device, contiguous, or None.
        n_rows: int32 tensor with one element (shape ``(1,)`` or ``()``, e.g. ``cu_seqlens[-1:]``) on ``x``'s
            device: how many leading rows of ``x`` are live. Never read on the host. Meant to lie in
            ``[0, capacity]``; the Triton kernel clamps it into that range, so no value writes out of bounds.
        activation: None, ``"gelu"`` (erf form, as ``F.gelu``), ``"gelu_tanh"`` (``approximate="tanh"``),
            ``"relu"`` or ``"tanh"``, applied in float32 (float64 for float64) before rounding to ``x``'s dtype.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
            ``"triton"`` runs the plan of the shape, which the measured table may set to cuBLAS (``"torch"``).

    Returns:
        ``y`` ``(capacity, N)`` in ``x``'s dtype. Rows ``< n_rows`` hold the result; rows ``>= n_rows`` are
        unspecified: the Triton kernel never writes them (they keep whatever the new allocation held), the
        PyTorch backend computes them from the dead rows of ``x``. The product accumulates in float32 with
        IEEE float32 products for float32 inputs (no TF32, as PyTorch's default).
    """
    check_tensor("x", x, ndim=2, dtypes=TORCH_DTYPES)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one feature column (K >= 1), got shape (capacity, 0)")
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (N >= 1, K={x.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_n_rows(n_rows, x.device)
    activation = check_activation(activation)
    chosen = choose_backend(backend, x.device)
    if chosen == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"x must be float16, bfloat16 or float32 on the triton backend, got {x.dtype}")
        from mp_kernels._triton import rows_linear as kernel

        plan = kernel.device_plan(x.dtype, x.shape[1], weight.shape[0], x.shape[0], x.device)
        if plan.backend == "triton":
            return kernel.rows_linear_triton(x, weight, bias, n_rows, activation=activation, plan=plan)
    return rows_linear_torch(x, weight, bias, n_rows, activation=activation)
