"""Triton kernel for ``rows_linear``: a tiled matmul that skips the dead rows of a fixed-capacity buffer, with a
planner that fills the GPU at small row counts by splitting ``K``.

The grid is static (``tiles * split_k`` programs with ``tiles = cdiv(capacity, BLOCK_M) * cdiv(N, BLOCK_N)``, a
function of shapes only), so a CUDA graph can capture it; the live row count is loaded from device memory by every
program, and a program whose row block starts at or after it returns before loading anything. Programs are
ordered in groups of ``GROUP_M`` row blocks that sweep the column blocks together, so the weight tiles they share
stay in L2.

Each program accumulates a ``BLOCK_M x BLOCK_N`` tile in float32 over its chunk of ``K`` in steps of ``BLOCK_K``
(``tl.dot`` with IEEE float32 products for float32 inputs: no TF32, as PyTorch's default). With ``split_k == 1``
the chunk is all of ``K`` and the program finishes its tile: bias and activation in float32, rounding to the
output dtype, a store of the rows below the live count. With ``split_k > 1`` (one launch still) every program
stores its float32 partial tile in a workspace and takes a ticket from the tile's arrival counter
(``semaphores.arrive``); the last of the tile's ``split_k`` programs to arrive sums the partials in the fixed
order ``0 .. split_k - 1`` and finishes the tile, so results are bitwise identical from run to run and no value
is accumulated by an atomic. All programs of a dead tile see the same live count and return before arriving, so
counters always end at zero.

The plan (``plan_rows_linear``) is fixed per shape and device, never autotuned (which would benchmark during
graph capture and choose differently from run to run): a measured table shipped with the package
(``gemm_table.json``, written by ``python -m bench.gpu_gemm --table``) where it has the shape, else a heuristic
that splits ``K`` until the launch has at least one program per SM. Under the Triton interpreter the tiles stay
small, since every program runs in sequence on the CPU.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mp_kernels._triton.semaphores import arrive, counters
from mp_kernels.dispatch import triton_interpreting

SMALL_CAPACITY = 128
SQRT_HALF = tl.constexpr(0.7071067811865476)
SQRT_TWO_OVER_PI = tl.constexpr(0.7978845608028654)
# The planner's device under TRITON_INTERPRET=1: its own small tiles, and a few "SMs" so that small shapes split.
INTERPRETER_DEVICE = "triton-interpreter"
INTERPRETER_SM_COUNT = 4
# A chunk of a split K holds at least this many BLOCK_K steps, so the partial's store and the fix-up stay small
# next to the chunk's own loads.
MIN_CHUNK_STEPS = 2
# The smallest tile sides the heuristic shrinks to (tl.dot needs 16 on a GPU).
MIN_BLOCK = 16
TABLE_PATH = Path(__file__).with_name("gemm_table.json")
BACKENDS = ("triton", "cublas")


class Tiles(NamedTuple):
    """Tile sizes and launch parameters of one ``rows_linear`` program."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


class GemmPlan(NamedTuple):
    """How one ``rows_linear`` shape runs on one device.

    ``backend`` ``"triton"``: ``programs = cdiv(capacity, block_m) * cdiv(N, block_n) * split_k`` programs of
    ``tiles``, ``K`` cut into ``split_k`` chunks of ``cdiv(cdiv(K, block_k), split_k)`` steps of ``block_k`` (no
    chunk empty for plans from the planner). ``"cublas"``: ``F.linear`` over the whole capacity (the PyTorch
    backend); its ``tiles`` are the heuristic's, unused, and ``programs`` is 0. ``source``: ``"table"`` (the
    measured table) or ``"heuristic"``.
    """

    tiles: Tiles
    split_k: int
    programs: int
    source: str
    backend: str


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the table's spelling of a dtype."""
    return str(dtype).removeprefix("torch.")


def launch_parameters(block_m: int, block_n: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` for a ``block_m x block_n`` tile: 8 warps on 128 x 128, 4 from 64 x 64, else 2."""
    area = block_m * block_n
    if area >= 128 * 128:
        return 8, 3
    return (4, 4) if area >= 64 * 64 else (2, 4)


def base_tiles(dtype: torch.dtype, n: int, capacity: int, device_name: str) -> Tiles:
    """The largest tiles for ``capacity`` rows of ``dtype`` and ``n`` output features (untuned on a GPU).

    Half precision: 128 x 128 x 64 for outputs of at least 512 features (128 x 64 x 64 below), or 64 x 64 x 64
    for buffers of at most ``SMALL_CAPACITY`` rows; float32 64 x 64 x 32, whose IEEE products run on the FMA
    units; ``BLOCK_M`` shrinks to the next power of two of a smaller ``capacity`` (at least 16). The interpreter
    always gets 32 x 64 x 32.
    """
    if device_name == INTERPRETER_DEVICE:
        return Tiles(block_m=32, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        block_m, block_n, block_k, group_m = 64, 64, 32, 8
    elif capacity <= SMALL_CAPACITY:
        block_m, block_n, block_k, group_m = 64, 64, 64, 1
    else:
        block_m, block_n, block_k, group_m = 128, 128 if n >= 512 else 64, 64, 8
    block_m = min(block_m, max(MIN_BLOCK, triton.next_power_of_2(max(capacity, 1))))
    return Tiles(block_m, block_n, block_k, group_m, *launch_parameters(block_m, block_n))


def smaller_tiles(tiles: Tiles) -> Tiles | None:
    """The next rung down the heuristic's ladder: ``BLOCK_N`` halves to 32, then ``BLOCK_K`` to 32, then ``BLOCK_N``
    and then ``BLOCK_K`` to 16; None at the bottom."""
    block_n, block_k = tiles.block_n, tiles.block_k
    if block_n > 32:
        block_n //= 2
    elif block_k > 32:
        block_k //= 2
    elif block_n > MIN_BLOCK:
        block_n //= 2
    elif block_k > MIN_BLOCK:
        block_k //= 2
    else:
        return None
    num_warps, num_stages = launch_parameters(tiles.block_m, block_n)
    return tiles._replace(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)


def tile_count(tiles: Tiles, n: int, capacity: int) -> int:
    """How many output tiles ``(capacity, n)`` has."""
    return triton.cdiv(capacity, tiles.block_m) * triton.cdiv(n, tiles.block_n)


def even_split(k_steps: int, split_k: int) -> int:
    """The number of non-empty chunks when ``k_steps`` steps are cut into ``split_k`` chunks of equal length."""
    return triton.cdiv(k_steps, triton.cdiv(k_steps, max(1, min(split_k, k_steps))))


def make_plan(tiles: Tiles, split_k: int, k: int, n: int, capacity: int, source: str) -> GemmPlan:
    """A Triton plan of ``tiles`` with ``split_k`` made even (no empty chunk)."""
    split_k = even_split(triton.cdiv(k, tiles.block_k), split_k)
    return GemmPlan(tiles, split_k, tile_count(tiles, n, capacity) * split_k, source, "triton")


@functools.cache  # a pure function of its arguments, asked again at every call of a shape
def heuristic_plan(dtype: torch.dtype, k: int, n: int, capacity: int, sm_count: int, device_name: str) -> GemmPlan:
    """The first rung of tiles, from ``base_tiles`` down, whose tiles times a split of ``K`` (chunks of at least
    ``MIN_CHUNK_STEPS`` steps) reach ``sm_count`` programs, with the smallest such split; else the rung with the
    most programs. A launch that already has ``sm_count`` tiles is not split."""
    tiles: Tiles | None = base_tiles(dtype, n, capacity, device_name)
    best: GemmPlan | None = None
    while tiles is not None:
        blocks = tile_count(tiles, n, capacity)
        k_steps = triton.cdiv(k, tiles.block_k)
        split_k = 1
        while blocks and blocks * even_split(k_steps, split_k) < sm_count and split_k < k_steps // MIN_CHUNK_STEPS:
            split_k += 1
        plan = make_plan(tiles, split_k, k, n, capacity, "heuristic")
        if plan.programs >= sm_count:
            return plan
        best = plan if best is None or plan.programs > best.programs else best
        tiles = smaller_tiles(tiles) if device_name != INTERPRETER_DEVICE else None
    return best


@functools.cache
def gemm_table() -> dict[tuple[str, str, int, int, int], dict]:
    """The measured table, ``{(device_name, dtype_name, k, n, capacity): entry}``, read once from ``TABLE_PATH``.

    An entry has ``backend`` (``"triton"`` with the ``Tiles`` fields and ``split_k``, or ``"cublas"``) and
    may carry its measurements; ``bench.gpu_gemm --table`` writes the file.
    """
    entries = json.loads(TABLE_PATH.read_text())["entries"]
    return {(e["device"], e["dtype"], e["k"], e["n"], e["capacity"]): e for e in entries}


def plan_rows_linear(
    dtype: torch.dtype, k: int, n: int, capacity: int, sm_count: int, device_name: str, *, use_table: bool = True
) -> GemmPlan:
    """The plan of a ``(capacity, k) @ (n, k)^T`` ``rows_linear`` in ``dtype`` on a device of ``sm_count`` SMs
    called ``device_name`` (``torch.cuda.get_device_name``, or ``INTERPRETER_DEVICE``): the table's entry for
    ``(device_name, dtype, k, n, capacity)`` if ``use_table`` and it has one, else ``heuristic_plan``."""
    heuristic = heuristic_plan(dtype, k, n, capacity, sm_count, device_name)
    entry = gemm_table().get((device_name, dtype_name(dtype), k, n, capacity)) if use_table else None
    if entry is None:
        return heuristic
    if entry["backend"] == "cublas":
        return heuristic._replace(split_k=1, programs=0, source="table", backend="cublas")
    tiles = Tiles(*(entry[field] for field in Tiles._fields))
    return make_plan(tiles, entry["split_k"], k, n, capacity, "table")


@functools.cache
def device_traits(device: torch.device) -> tuple[int, str]:
    """``(sm_count, device_name)`` of the planner for ``device`` (a CUDA device with its index, or the CPU):
    ``INTERPRETER_SM_COUNT`` and ``INTERPRETER_DEVICE`` under the interpreter."""
    if device.type != "cuda" or triton_interpreting():
        return INTERPRETER_SM_COUNT, INTERPRETER_DEVICE
    properties = torch.cuda.get_device_properties(device)
    return properties.multi_processor_count, properties.name


def device_plan(
    dtype: torch.dtype, k: int, n: int, capacity: int, device: torch.device, *, use_table: bool = True
) -> GemmPlan:
    """``plan_rows_linear`` on ``device``'s SM count and name (cached per device; no host synchronisation)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sm_count, name = device_traits(device)
    return plan_rows_linear(dtype, k, n, capacity, sm_count, name, use_table=use_table)


@triton.jit
def activate(v, ACTIVATION: tl.constexpr):
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
def _finish_tile(acc, b_ptr, y_ptr, rows, cols, mask, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Add the bias, apply the activation in float32, round to ``y``'s dtype and store the ``mask``ed tile."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACTIVATION)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    n_rows_ptr,
    part_ptr,
    counter_ptr,
    capacity,
    N,
    K,
    CHUNK_K,
    PLANE,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """``y[:n] = act(x[:n] @ w.T + b)`` with ``n = clamp(n_rows, 0, capacity)``; rows ``>= n`` untouched.

    ``x`` ``(capacity, K)``, ``w`` ``(N, K)``, ``b`` ``(N,)`` (read only if ``HAS_BIAS``), ``y`` ``(capacity, N)``,
    all contiguous; ``n_rows`` one int32. Program ``pid`` computes tile ``pid % tiles`` over the ``K`` columns
    ``[c * CHUNK_K, (c + 1) * CHUNK_K)`` of chunk ``c = pid // tiles``. With ``SPLIT_K > 1``: ``part`` float32
    ``(SPLIT_K, capacity, N)`` (``PLANE = capacity * N`` elements a chunk) receives the partials (only live rows
    are written and read) and ``counter`` int32 ``(tiles,)``, zero on entry, is left at zero. ``PRECISION`` is
    ``tl.dot``'s input precision: ``"ieee"`` for float32 inputs, else None.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(capacity, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    tile = pid % (blocks_m * blocks_n)
    chunk = pid // (blocks_m * blocks_n)
    per_group = GROUP_M * blocks_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    block_m = first_m + (tile % per_group) % group_m
    block_n = (tile % per_group) // group_m
    live = tl.minimum(tl.load(n_rows_ptr), capacity)
    if block_m * BLOCK_M >= live:
        return
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_valid = rows < live
    col_valid = cols < N
    k_start = chunk * CHUNK_K
    k_end = tl.minimum(K, k_start + CHUNK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + (k_start + ks)[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * K + (k_start + ks)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(k_start, k_end, BLOCK_K):
        k_valid = ks < k_end - start
        a = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = row_valid[:, None] & col_valid[None, :]
    if SPLIT_K == 1:
        _finish_tile(acc, b_ptr, y_ptr, rows, cols, mask, N, HAS_BIAS, ACTIVATION)
    else:
        part_ptrs = part_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(part_ptrs + chunk.to(tl.int64) * PLANE, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket's release
        if arrive(counter_ptr + tile, SPLIT_K):
            total = tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            for _ in tl.static_range(1, SPLIT_K):
                part_ptrs += PLANE
                total += tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            _finish_tile(total, b_ptr, y_ptr, rows, cols, mask, N, HAS_BIAS, ACTIVATION)


def rows_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_rows: torch.Tensor,
    *,
    activation: str | None = None,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """Validated inputs as in ``rows_linear``; returns ``(capacity, N)`` in ``x``'s dtype.

    ``plan``: a ``"triton"`` ``GemmPlan`` (any tiles of powers of two from 16 and any ``split_k >= 1``; its
    ``programs`` is not read), or None for ``device_plan`` without the table. One launch, no host
    synchronisation; the output is allocated with ``torch.empty`` and only its rows below the live count are
    written; ``split_k > 1`` adds a ``torch.empty`` float32 workspace ``(split_k, capacity, N)`` and uses the
    device's shared arrival counters.
    """
    capacity, k = x.shape
    n = weight.shape[0]
    y = torch.empty((capacity, n), dtype=x.dtype, device=x.device)
    if capacity == 0:
        return y
    plan = device_plan(x.dtype, k, n, capacity, x.device, use_table=False) if plan is None else plan
    if plan.backend != "triton" or plan.split_k < 1:
        raise ValueError(f"plan must be a triton plan with split_k >= 1, got {plan}")
    tiles, split_k = plan.tiles, plan.split_k
    part = torch.empty((split_k, capacity, n), dtype=torch.float32, device=x.device) if split_k > 1 else y
    counter = counters(tile_count(tiles, n, capacity), x.device) if split_k > 1 else n_rows
    _rows_linear_kernel[(tile_count(tiles, n, capacity) * split_k,)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        n_rows,
        part,
        counter,
        capacity,
        n,
        k,
        triton.cdiv(triton.cdiv(k, tiles.block_k), split_k) * tiles.block_k,
        capacity * n,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation or "none",
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        SPLIT_K=split_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return y
