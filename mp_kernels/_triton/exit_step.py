"""Triton kernel for ``exit_step``: one launch, the pooling spread over row chunks, nothing read back.

Grid ``(parts, batch)``. Program ``(p, b)`` returns at once unless slot ``b`` is alive and non-empty (every
program of a slot reads the same ``alive`` and length, so a dead slot's programs all return and none arrives). The
slot's rows come from ``segment``, clamped into the hidden buffer (``cu_seqlens`` is not checked on this path).
Otherwise it sums, in float32, the rows of the slot's chunks ``p, p + parts, p + 2 parts, ...`` (``CHUNK`` rows
each) for all ``d`` feature columns (``BLOCK_D`` at a time), writes that partial ``(d,)`` to the float32 workspace
``(parts, batch, d)`` and arrives on the slot's counter (``semaphores.arrive``). Only the programs that own at
least one chunk take part: ``min(parts, cdiv(n, CHUNK))`` of them, a count every program of the slot computes
from the slot's length, so the counter always returns to zero. A slot longer than ``parts * CHUNK`` rows (a
small ``max_rows`` hint) is still pooled whole, by fewer programs.

The last program to arrive finishes the slot, as the single program did before: per column block it adds the
partials in a fixed order (one ``tl.sum`` over the partial axis of a ``(BLOCK_P, BLOCK_D)`` tile), divides by
the length, rounds the mean to the input dtype and folds it into the sub-classifier's pre-activation
``W1[:, block] @ pooled[block]`` (``BLOCK_W >= w`` accumulators in float32). Then bias, rounding, tanh (through
one ``exp``: ``rows_linear.activate``), rounding, the ``classes x w`` product, rounding, the
softmax entropy over the classes and the exit decision; an exiting slot writes its logits, its exit layer and
``alive = false``. The result does not depend on which program arrives last, so it is bitwise the same on every
run with the same ``max_rows``. Zero probabilities contribute 0 by an ``== 0`` test and clamping uses
comparisons, so a NaN anywhere in the logits keeps the uncertainty NaN, which never passes ``<= tau``
(``tl.minimum``/``tl.maximum`` would turn it into a bound on a GPU, a ``p > 0`` mask would drop it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mp_kernels._triton.rows_linear import activate
from mp_kernels._triton.segments import segment
from mp_kernels._triton.semaphores import arrive, counters

BLOCK_D = 64
CHUNK = 32  # rows a program sums per step; a slot of n rows is split over cdiv(n, CHUNK) programs at most
MAX_PARTS = 64  # programs per slot at most (the finishing tile holds one partial per program)


@triton.jit(do_not_specialize=["layer"])  # layer 1 would become a constexpr, without .to()
def _exit_step_kernel(
    hidden_ptr,
    cu_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    tau_ptr,
    schedule_ptr,
    logits_ptr,
    exit_layer_ptr,
    alive_ptr,
    partial_ptr,
    counter_ptr,
    rows_total,
    d,
    width,
    classes,
    layer,
    inv_log_classes,
    HAS_SCHEDULE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHUNK: tl.constexpr,
):
    part = tl.program_id(0)
    slot = tl.program_id(1)
    parts = tl.num_programs(0)
    batch = tl.num_programs(1)
    if tl.load(alive_ptr + slot) == 0:
        return
    start, n = segment(cu_ptr, slot, rows_total)
    start = start.to(tl.int64)
    chunks = tl.cdiv(n, CHUNK)
    if part >= chunks:  # also every program of an empty slot: no chunk, no arrival
        return
    dtype = hidden_ptr.dtype.element_ty
    offs_r = tl.arange(0, CHUNK)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < d
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in range(part, chunks, parts):
            rows = c * CHUNK + offs_r
            tile_mask = (rows < n)[:, None] & d_valid[None, :]
            x = tl.load(hidden_ptr + (start + rows)[:, None] * d + offs_d[None, :], mask=tile_mask, other=0.0)
            total += tl.sum(x.to(tl.float32), axis=0)
        tl.store(partial_ptr + (part * batch + slot) * d + offs_d, total, mask=d_valid)
    tl.debug_barrier()  # every thread's partial is stored before the release of the arrival
    if arrive(counter_ptr + slot, tl.minimum(chunks, parts)):
        offs_w = tl.arange(0, BLOCK_W)
        w_valid = offs_w < width
        offs_p = tl.arange(0, BLOCK_P)
        p_valid = offs_p < tl.minimum(chunks, parts)
        pre = tl.zeros([BLOCK_W], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_valid = offs_d < d
            sums_ptr = partial_ptr + (offs_p[:, None] * batch + slot) * d + offs_d[None, :]
            sums = tl.load(sums_ptr, mask=p_valid[:, None] & d_valid[None, :], other=0.0, cache_modifier=".cg")
            pooled = (tl.sum(sums, axis=0) / n.to(tl.float32)).to(dtype).to(tl.float32)
            w1_mask = w_valid[:, None] & d_valid[None, :]
            w1 = tl.load(w1_ptr + offs_w[:, None] * d + offs_d[None, :], mask=w1_mask, other=0.0).to(tl.float32)
            pre += tl.sum(w1 * pooled[None, :], axis=1)
        pre = (pre + tl.load(b1_ptr + offs_w, mask=w_valid, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        hidden_units = activate(pre, "tanh").to(dtype).to(tl.float32)
        offs_c = tl.arange(0, BLOCK_C)
        c_valid = offs_c < classes
        w2_mask = c_valid[:, None] & w_valid[None, :]
        w2 = tl.load(w2_ptr + offs_c[:, None] * width + offs_w[None, :], mask=w2_mask, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        z = (tl.sum(w2 * hidden_units[None, :], axis=1) + b2).to(dtype)
        if HAS_SCHEDULE:
            exits = tl.load(schedule_ptr + slot) == layer
        else:
            x = tl.where(c_valid, z.to(tl.float32), float("-inf"))
            shifted = x - tl.max(x, axis=0)
            e = tl.exp(shifted)
            p = e / tl.sum(e, axis=0)
            plogp = tl.where(p == 0.0, 0.0, p * tl.log(tl.where(p == 0.0, 1.0, p)))
            uncertainty = -tl.sum(plogp, axis=0) * inv_log_classes
            uncertainty = tl.where(uncertainty < 0.0, 0.0, uncertainty)
            uncertainty = tl.where(uncertainty > 1.0, 1.0, uncertainty)
            exits = uncertainty <= tl.load(tau_ptr)
        if exits:
            tl.store(logits_ptr + slot * classes + offs_c, z, mask=c_valid)
            tl.store(exit_layer_ptr + slot, layer.to(tl.int64))
            tl.store(alive_ptr + slot, exits == 0)


def exit_step_parts(max_rows: int) -> int:
    """Programs per slot for slots of at most ``max_rows`` rows: ``cdiv(max_rows, CHUNK)``, in ``[1, MAX_PARTS]``."""
    return min(max(triton.cdiv(max_rows, CHUNK), 1), MAX_PARTS)


def exit_step_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    tau: torch.Tensor,
    layer: int,
    logits: torch.Tensor,
    exit_layer: torch.Tensor,
    alive: torch.Tensor,
    schedule: torch.Tensor | None,
    max_rows: int,
) -> None:
    """Validated inputs as in ``exit_step``; one launch of ``(exit_step_parts(max_rows), batch)`` programs.

    ``max_rows`` (host-known, e.g. the padded width) sizes the grid only: longer slots are pooled whole, by fewer
    programs. A float32 ``(parts, batch, d)`` workspace holds the partial sums; one shared arrival counter per
    slot (left at zero). Updates ``logits``, ``exit_layer`` and ``alive`` in place.
    """
    d = hidden.shape[1]
    width, classes = dense_weight.shape[0], classifier_weight.shape[0]
    batch = alive.shape[0]
    parts = exit_step_parts(max_rows)
    partials = torch.empty(parts, batch, d, dtype=torch.float32, device=hidden.device)
    _exit_step_kernel[(parts, batch)](
        hidden,
        cu_seqlens,
        dense_weight,
        dense_bias,
        classifier_weight,
        classifier_bias,
        tau,
        schedule if schedule is not None else exit_layer,
        logits,
        exit_layer,
        alive,
        partials,
        counters(batch, hidden.device),
        hidden.shape[0],
        d,
        width,
        classes,
        layer,
        1.0 / math.log(classes),
        HAS_SCHEDULE=schedule is not None,
        BLOCK_D=BLOCK_D,
        BLOCK_W=max(triton.next_power_of_2(width), 16),
        BLOCK_C=max(triton.next_power_of_2(classes), 16),
        BLOCK_P=max(triton.next_power_of_2(parts), 16),
        CHUNK=CHUNK,
    )
