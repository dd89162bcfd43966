"""Triton kernel for ``add_layer_norm``: ``LayerNorm(x + residual)`` that skips the dead rows of a buffer.

One program normalises ``ROWS`` rows held whole in a ``ROWS x BLOCK_D`` tile (``BLOCK_D`` the next power of two
of ``d``, so one read of each input and one write). The grid is static (``cdiv(capacity, ROWS)`` programs); each
program loads the live row count from device memory and returns at once if its first row is not live.

The sum is rounded to the input dtype before the statistics, as PyTorch adds two half-precision tensors (in
float32, rounded once); mean and biased variance are then taken in float32, two-pass over the registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels.dispatch import triton_interpreting

TILE = 4096
MAX_ROWS = 16


@triton.jit
def normalise_rows(s, valid, weight, bias, d, eps):
    """LayerNorm of the rows of a float32 tile ``s`` (entries outside ``valid`` are 0): mean and biased variance
    over the ``d`` valid columns, two-pass over the registers, then ``* weight + bias`` (float32 vectors); the one
    statement of the normalisation for every kernel that ends in a LayerNorm."""
    mean = tl.sum(s, axis=1) / d
    centred = tl.where(valid, s - mean[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / d
    rstd = 1.0 / tl.sqrt(variance + eps)
    return centred * rstd[:, None] * weight[None, :] + bias[None, :]


@triton.jit
def _add_layer_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    n_rows_ptr,
    capacity,
    d,
    eps,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``y[:n] = LayerNorm(x[:n] + r[:n]) * w + b`` with ``n = clamp(n_rows, 0, capacity)``; rows ``>= n``
    untouched. ``x``, ``r``, ``y`` ``(capacity, d)``, ``w``, ``b`` ``(d,)``, all contiguous; ``n_rows`` one int32.
    """
    live = tl.minimum(tl.load(n_rows_ptr), capacity)
    first = tl.program_id(0) * ROWS
    if first >= live:
        return
    rows = first + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < d
    valid = (rows < live)[:, None] & col_valid[None, :]
    offsets = rows.to(tl.int64)[:, None] * d + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
    r = tl.load(r_ptr + offsets, mask=valid, other=0.0)
    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    y = normalise_rows(s, valid, w, b, d, eps)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


def layout(d: int) -> tuple[int, int, int]:
    """``(ROWS, BLOCK_D, num_warps)`` for rows of ``d`` features: tiles of about ``TILE`` elements.

    ``BLOCK_D`` is the next power of two of ``d`` (at least 16); ``ROWS`` fills the tile up to ``MAX_ROWS`` rows
    (at least 1); 4 warps, 8 for tiles over 2048 elements. Untuned on a GPU; under the interpreter ``ROWS`` is 16
    whatever ``d``, as fewer, larger programs run faster there.
    """
    block_d = max(16, triton.next_power_of_2(d))
    if triton_interpreting():
        return MAX_ROWS, block_d, 4
    rows = max(1, min(MAX_ROWS, TILE // block_d))
    return rows, block_d, 4 if rows * block_d <= 2048 else 8


def add_layer_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    n_rows: torch.Tensor,
) -> torch.Tensor:
    """Validated inputs as in ``add_layer_norm``; returns ``(capacity, d)`` in ``x``'s dtype.

    One launch, no host synchronisation; the output is allocated with ``torch.empty`` and only its rows below
    the live count are written.
    """
    capacity, d = x.shape
    y = torch.empty((capacity, d), dtype=x.dtype, device=x.device)
    if capacity == 0:
        return y
    rows, block_d, num_warps = layout(d)
    _add_layer_norm_kernel[(triton.cdiv(capacity, rows),)](
        x, residual, weight, bias, y, n_rows, capacity, d, eps, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps
    )
    return y
