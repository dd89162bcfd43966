"""Triton kernel for ``rows_linear``: a tiled matmul that skips the dead rows of a fixed-capacity buffer.

The grid is static (``cdiv(capacity, BLOCK_M) * cdiv(N, BLOCK_N)`` programs, a function of shapes only), so a
CUDA graph can capture it; the live row count is loaded from device memory by every program, and a program whose
row block starts at or after it returns before loading anything. Programs are ordered in groups of ``GROUP_M``
row blocks that sweep the column blocks together, so the weight tiles they share stay in L2.

Each program accumulates a ``BLOCK_M x BLOCK_N`` tile in float32 over ``K`` in steps of ``BLOCK_K``
(``tl.dot`` with IEEE float32 products for float32 inputs: no TF32, as PyTorch's default), adds the bias and
applies the activation in float32, rounds to the output dtype and stores only rows below the live count.

The tile table is fixed (no autotuning, which would benchmark during graph capture and choose differently from
run to run): sizes usual for Hopper, chosen by dtype and ``N`` but not tuned on a GPU yet; small tiles under
the Triton interpreter, where every program runs in sequence on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mp_kernels.dispatch import triton_interpreting

SMALL_CAPACITY = 128
SQRT_HALF = tl.constexpr(0.7071067811865476)
SQRT_TWO_OVER_PI = tl.constexpr(0.7978845608028654)


class TileConfig(NamedTuple):
    """Tile sizes and launch parameters of one ``rows_linear`` launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def tile_config(dtype: torch.dtype, k: int, n: int, capacity: int) -> TileConfig:
    """The fixed tile choice for ``capacity`` rows of ``dtype`` with ``k`` input and ``n`` output features.

    Untuned on a GPU: for half precision 128 x 128 x 64 tiles on 8 warps (128 x 64 x 64 on 4 warps for outputs
    narrower than 512), for float32 64 x 64 x 32, whose IEEE products run on the FMA units. Buffers of at most
    ``SMALL_CAPACITY`` rows (batch 1 and small buckets) get 64 x 64 tiles: with one row block the grid is
    ``n / BLOCK_N`` programs, and narrower column blocks spread the weight read over more SMs (predicted, to be
    measured by ``bench.gpu_gemm``). ``k`` is part of the key for future tuning; every tile dimension is at least
    16, as ``tl.dot`` requires on a GPU.
    """
    if triton_interpreting():
        return TileConfig(block_m=32, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return TileConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)
    if capacity <= SMALL_CAPACITY:
        return TileConfig(block_m=64, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=4)
    if n >= 512:
        return TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    return TileConfig(block_m=128, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    """``ACTIVATION`` (``"none"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"tanh"``) of a float32 tile.

    ``tanh(z)`` comes from one exponential, exact at +-inf: ``sign(z) (1 - e) / (1 + e)`` with ``e = exp(-2|z|)``.
    """
    if ACTIVATION == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * SQRT_HALF))
    elif ACTIVATION == "relu":
        v = tl.maximum(v, 0.0)
    elif ACTIVATION != "none":
        z = v
        if ACTIVATION == "gelu_tanh":
            z = SQRT_TWO_OVER_PI * (v + 0.044715 * v * v * v)
        e = tl.exp(-2.0 * tl.maximum(z, -z))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z < 0, -t, t)
        if ACTIVATION == "gelu_tanh":
            v = 0.5 * v * (1.0 + t)
        else:
            v = t
    return v


@triton.jit
def _rows_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    n_rows_ptr,
    capacity,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y[:n] = act(x[:n] @ w.T + b)`` with ``n = clamp(n_rows, 0, capacity)``; rows ``>= n`` untouched.

    ``x`` ``(capacity, K)``, ``w`` ``(N, K)``, ``b`` ``(N,)`` (read only if ``HAS_BIAS``), ``y`` ``(capacity, N)``,
    all contiguous; ``n_rows`` one int32. ``PRECISION`` is ``tl.dot``'s input precision: ``"ieee"`` for float32
    inputs, else None.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(capacity, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % per_group) % group_m
    block_n = (pid % per_group) // group_m
    live = tl.minimum(tl.load(n_rows_ptr), capacity)
    if block_m * BLOCK_M >= live:
        return
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_valid = rows < live
    col_valid = cols < N
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_valid = ks < K - start
        a = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    acc = _activate(acc, ACTIVATION)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def rows_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_rows: torch.Tensor,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """Validated inputs as in ``rows_linear``; returns ``(capacity, N)`` in ``x``'s dtype.

    One launch, no host synchronisation; the output is allocated with ``torch.empty`` and only its rows below
    the live count are written.
    """
    capacity, k = x.shape
    n = weight.shape[0]
    y = torch.empty((capacity, n), dtype=x.dtype, device=x.device)
    if capacity == 0:
        return y
    config = tile_config(x.dtype, k, n, capacity)
    grid = (triton.cdiv(capacity, config.block_m) * triton.cdiv(n, config.block_n),)
    _rows_linear_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        n_rows,
        capacity,
        n,
        k,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation or "none",
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y
