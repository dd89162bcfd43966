"""Triton kernel for ``linear_add_layer_norm``: a GEMM whose epilogue adds the residual and applies LayerNorm.

One launch computes ``LayerNorm(round(round(x @ W.T + b) + residual))`` for the live rows of a fixed-capacity
buffer and stores each row at its destination. The epilogue needs whole rows, so a row block's result is
finished by one program that holds a ``BLOCK_M x BLOCK_N`` tile (``BLOCK_N`` the next power of two of ``N``).

To fill the GPU when the buffer has few row blocks, the GEMM of a row block is split over ``n_chunks`` column
chunks (``BLOCK_NC`` columns each) and ``split_k`` chunks of ``K``: each (row block, column chunk, k chunk)
program writes its float32 partial product to a workspace ``(split_k, capacity, N)`` and arrives on its row
block's counter (``semaphores.arrive``); the last to arrive sums the ``split_k`` partials of the whole row in
the fixed order ``0, 1, ...`` (read through L2 with ``.cg``) and runs the epilogue. The result does not depend on
which program arrives last: deterministic, no value accumulated by an atomic, counters left at zero. With a
single part per row block the workspace and counters are skipped.

The grid is static (``blocks_m * n_chunks * split_k`` programs, host-known shapes only); every program loads the
live row count, and the programs of a row block that starts at or after it return before arriving (all of them
see the same count, so no counter is left half-taken).

``plan`` chooses the tiles from ``(dtype, K, N, capacity, sm_count)`` by a fixed rule (no autotuning, which
would benchmark during CUDA-graph capture): untuned on a GPU yet.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mp_kernels._triton.add_layer_norm import normalise_rows
from mp_kernels._triton.rows_linear import device_traits
from mp_kernels._triton.semaphores import arrive, counters
from mp_kernels.dispatch import triton_interpreting

MAX_TILE = 16384  # float32 accumulator elements a program may hold (64 a thread at 8 warps: 128 spilled on sm_90)
MAX_STAGE_BYTES = 65536  # shared memory of one pipeline stage (an x tile and a weight tile)
SHARED_BYTES = 163840  # shared memory the pipeline stages may take together
BLOCK_MS = (128, 64, 32, 16)
MIN_BLOCK_NC = 32
BLOCK_KS = (64, 32, 16)


class Plan(NamedTuple):
    """Tiles and split of one ``linear_add_layer_norm`` launch; ``programs`` is the grid size."""

    block_m: int
    block_n: int
    block_nc: int
    block_k: int
    n_chunks: int
    split_k: int
    k_chunk: int
    programs: int
    num_warps: int
    num_stages: int
    epi_m: int = 16


def make_plan(
    dtype: torch.dtype, k: int, n: int, capacity: int, block_m: int, block_nc: int, block_k: int, split_k: int
) -> Plan:
    """The launch of ``capacity`` rows with the given tiles, ``K`` split into at most ``split_k`` chunks.

    Each k chunk is a whole number of ``block_k`` steps, so the effective split (``Plan.split_k``) can be smaller
    than asked (``K = 48`` in steps of 16 split 2 ways is 32 + 16). ``block_nc`` is rounded up to a power of two of at
    least 16 and capped at ``BLOCK_N``, the next power of two of ``n`` (at least 16): every tile dimension is at
    least 16, as ``tl.dot`` requires on a GPU. ``block_m`` and ``block_k`` must be powers of two of at least 16.
    """
    block_n = max(16, triton.next_power_of_2(n))
    block_nc = min(max(16, triton.next_power_of_2(block_nc)), block_n)
    steps = triton.cdiv(k, block_k)
    k_chunk = triton.cdiv(steps, max(1, min(split_k, steps))) * block_k
    split_k = triton.cdiv(k, k_chunk)
    n_chunks = triton.cdiv(n, block_nc)
    stage_bytes = (block_m + block_nc) * block_k * dtype.itemsize
    tile = block_m * (block_nc if n_chunks * split_k > 1 else block_n)
    return Plan(
        block_m=block_m,
        block_n=block_n,
        block_nc=block_nc,
        block_k=block_k,
        n_chunks=n_chunks,
        split_k=split_k,
        k_chunk=k_chunk,
        programs=triton.cdiv(capacity, block_m) * n_chunks * split_k,
        num_warps=8 if max(tile, block_n * 16) >= 8192 else 4,
        num_stages=max(1, min(4, SHARED_BYTES // stage_bytes)),
        epi_m=max(16, min(block_m, MAX_TILE // block_n)),
    )


@functools.cache
def plan(dtype: torch.dtype, k: int, n: int, capacity: int, sm_count: int) -> Plan:
    """The launch for ``capacity`` rows of ``dtype``, ``k`` input and ``n`` output features on ``sm_count`` SMs.

    Among the tilings that fit (accumulators of at most ``MAX_TILE`` elements, pipeline stages of at most
    ``MAX_STAGE_BYTES``, ``BLOCK_M`` no taller than the buffer needs) and give at least ``sm_count`` programs,
    the one with the smallest K split (each k chunk writes and re-reads a float32 partial of the rows; column
    chunks cost only re-reads of ``x`` from L2), then the largest ``BLOCK_M x BLOCK_NC`` tile (fewest programs),
    then the largest ``BLOCK_M`` (fewest re-reads of the weight), then the largest ``BLOCK_K``. If
    none reaches ``sm_count`` (a tiny GEMM), the one with the most programs.
    """
    block_n = max(16, triton.next_power_of_2(n))
    best: tuple[tuple[int, ...], Plan] | None = None
    for block_m in BLOCK_MS:
        if block_m > max(BLOCK_MS[-1], triton.next_power_of_2(capacity)):
            continue
        block_nc = block_n
        while block_nc >= min(MIN_BLOCK_NC, block_n):
            for block_k in BLOCK_KS:
                if (block_m + block_nc) * block_k * dtype.itemsize > MAX_STAGE_BYTES:
                    continue
                for split_k in range(1, triton.cdiv(k, block_k) + 1):
                    candidate = make_plan(dtype, k, n, capacity, block_m, block_nc, block_k, split_k)
                    whole_rows = candidate.n_chunks * candidate.split_k == 1
                    if block_m * (block_n if whole_rows else block_nc) > MAX_TILE:
                        continue
                    full = candidate.programs >= sm_count
                    key = (
                        full,
                        -candidate.split_k if full else candidate.programs,
                        block_m * block_nc if full else -candidate.split_k,
                        block_m,
                        block_k,
                    )
                    if best is None or key > best[0]:
                        best = (key, candidate)
            block_nc //= 2
    return best[1]


@triton.jit
def _epilogue(
    acc,
    rows,
    live,
    b_ptr,
    r_ptr,
    nw_ptr,
    nb_ptr,
    y_ptr,
    dest_ptr,
    capacity,
    N,
    eps,
    HAS_DEST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bias, rounding, residual, rounding, LayerNorm and the (scattered) store of a ``BLOCK_M x BLOCK_N`` tile of
    float32 products ``acc`` whose columns ``>= N`` are 0."""
    cols = tl.arange(0, BLOCK_N)
    col_valid = cols < N
    row_valid = rows < live
    valid = row_valid[:, None] & col_valid[None, :]
    bias = tl.load(b_ptr + cols, mask=col_valid, other=0.0)
    v = (acc + bias.to(tl.float32)[None, :]).to(bias.dtype)
    residual = tl.load(r_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=valid, other=0.0)
    s = (v.to(tl.float32) + residual.to(tl.float32)).to(bias.dtype).to(tl.float32)
    s = tl.where(valid, s, 0.0)
    w = tl.load(nw_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    b = tl.load(nb_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    y = normalise_rows(s, valid, w, b, N, eps)
    if HAS_DEST:
        target = tl.load(dest_ptr + rows, mask=row_valid, other=-1)
        lands = row_valid & (target >= 0) & (target < capacity)
    else:
        target = rows
        lands = row_valid
    y_ptrs = y_ptr + target.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=lands[:, None] & col_valid[None, :])


@triton.jit
def _linear_add_layer_norm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    nw_ptr,
    nb_ptr,
    y_ptr,
    dest_ptr,
    n_rows_ptr,
    part_ptr,
    counter_ptr,
    capacity,
    N,
    K,
    k_chunk,
    n_chunks,
    split_k,
    eps,
    HAS_DEST: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPI_M: tl.constexpr,
):
    """``y[dest[r]] = LayerNorm(round(round(x[r] @ w.T + b) + res[r])) * nw + nb`` for ``r < clamp(n_rows)``.

    ``x`` ``(capacity, K)``, ``w`` ``(N, K)``, ``b``, ``nw``, ``nb`` ``(N,)``, ``res`` and ``y`` ``(capacity, N)``,
    ``dest`` int32 ``(capacity,)`` (read only if ``HAS_DEST``, else row ``r`` goes to row ``r``), all contiguous;
    ``n_rows`` one int32. ``SPLIT``: more than one part per row block, whose float32 partials go to ``part``
    ``(split_k, capacity, N)``, finished by the last part to arrive on ``counter[row block]``, ``EPI_M`` rows at a
    time (so that a tall GEMM tile does not need a tall whole-row tile). ``PRECISION`` is
    ``tl.dot``'s input precision: ``"ieee"`` for float32 inputs, else None.
    """
    pid = tl.program_id(0)
    parts = n_chunks * split_k
    block_m = pid // parts
    chunk_n = pid % n_chunks
    chunk_k = (pid % parts) // n_chunks
    live = tl.minimum(tl.load(n_rows_ptr), capacity)
    if block_m * BLOCK_M >= live:
        return
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = chunk_n * BLOCK_NC + tl.arange(0, BLOCK_NC)
    row_valid = rows < live
    col_valid = cols < N
    k_start = chunk_k * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    ks = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_NC), dtype=tl.float32)
    for start in range(k_start, k_end, BLOCK_K):
        k_valid = ks < k_end - (start - k_start)
        a = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SPLIT:
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(part_ptr + chunk_k * capacity * N + offsets, acc, mask=row_valid[:, None] & col_valid[None, :])
        tl.debug_barrier()
        if arrive(counter_ptr + block_m, parts):
            all_cols = tl.arange(0, BLOCK_N)
            for sub in tl.static_range(0, BLOCK_M, EPI_M):
                epi_rows = block_m * BLOCK_M + sub + tl.arange(0, EPI_M)
                full = epi_rows.to(tl.int64)[:, None] * N + all_cols[None, :]
                valid = (epi_rows < live)[:, None] & (all_cols < N)[None, :]
                total = tl.zeros((EPI_M, BLOCK_N), dtype=tl.float32)
                for chunk in range(0, split_k):
                    part = part_ptr + chunk * capacity * N + full
                    total += tl.load(part, mask=valid, other=0.0, cache_modifier=".cg")
                _epilogue(
                    total, epi_rows, live, b_ptr, r_ptr, nw_ptr, nb_ptr, y_ptr, dest_ptr, capacity, N, eps, HAS_DEST,
                    BLOCK_N,
                )  # fmt: skip
    else:
        _epilogue(acc, rows, live, b_ptr, r_ptr, nw_ptr, nb_ptr, y_ptr, dest_ptr, capacity, N, eps, HAS_DEST, BLOCK_N)


def linear_add_layer_norm_triton(
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
    launch: Plan | None = None,
) -> torch.Tensor:
    """Validated inputs as in ``linear_add_layer_norm``; returns ``(capacity, N)`` in ``x``'s dtype.

    ``launch``: the tiles and split (``make_plan``), by default ``plan(...)`` for the device's SM count; tests
    pass one to force a split. One launch, no host synchronisation: the output (``torch.empty``; only rows that
    a live row lands in are written) and, when split, the float32 workspace ``(split_k, capacity, N)`` are the
    only allocations, and the arrival counters are shared (grown, outside capture, to one per row block).
    """
    capacity, k = x.shape
    n = weight.shape[0]
    y = torch.empty((capacity, n), dtype=x.dtype, device=x.device)
    if capacity == 0:
        return y
    if launch is None:
        if triton_interpreting():  # programs run in sequence: one part per row block
            launch = make_plan(x.dtype, k, n, capacity, 16, n, 32, 1)
        else:
            launch = plan(x.dtype, k, n, capacity, device_traits(x.device)[0])
    split = launch.n_chunks * launch.split_k > 1
    if split:
        part = torch.empty((launch.split_k, capacity, n), dtype=torch.float32, device=x.device)
        counter = counters(triton.cdiv(capacity, launch.block_m), x.device)
    else:
        part, counter = y, n_rows
    _linear_add_layer_norm_kernel[(launch.programs,)](
        x,
        weight,
        bias,
        residual,
        norm_weight,
        norm_bias,
        y,
        dest if dest is not None else n_rows,
        n_rows,
        part,
        counter,
        capacity,
        n,
        k,
        launch.k_chunk,
        launch.n_chunks,
        launch.split_k,
        eps,
        HAS_DEST=dest is not None,
        SPLIT=split,
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        BLOCK_NC=launch.block_nc,
        BLOCK_K=launch.block_k,
        EPI_M=launch.epi_m,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return y
