"""Triton kernel for ``exit_step``: one launch, one program per slot, nothing read back.

Program ``b`` returns at once unless slot ``b`` is alive and non-empty. Otherwise it walks the feature columns in
chunks of ``BLOCK_D``: sums the slot's rows of that chunk (``ROWS`` at a time, float32), rounds the mean to the
input dtype, and folds the chunk into the sub-classifier's hidden pre-activation ``W1[:, chunk] @ pooled[chunk]``
(``BLOCK_W >= w`` accumulators in float32), so neither the pooled vector nor ``W1`` is ever held whole. Then
bias, rounding, tanh (through ``exp``: ``sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})``), rounding, the ``classes x w``
product, rounding, the softmax entropy over the classes and the exit decision; an exiting slot writes its
logits, its exit layer and ``alive = false``. Zero probabilities contribute 0 by an ``== 0`` test and clamping
uses comparisons, so a NaN anywhere in the logits keeps the uncertainty NaN, which never passes ``<= tau``
(``tl.minimum``/``tl.maximum`` would turn it into a bound on a GPU, a ``p > 0`` mask would drop it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_D = 64
ROWS = 16


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
    d,
    width,
    classes,
    layer,
    inv_log_classes,
    HAS_SCHEDULE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    slot = tl.program_id(0)
    if tl.load(alive_ptr + slot) == 0:
        return
    start = tl.load(cu_ptr + slot).to(tl.int64)
    n = (tl.load(cu_ptr + slot + 1) - start).to(tl.int32)
    if n == 0:
        return
    dtype = hidden_ptr.dtype.element_ty
    offs_w = tl.arange(0, BLOCK_W)
    w_valid = offs_w < width
    offs_r = tl.arange(0, ROWS)
    pre = tl.zeros([BLOCK_W], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < d
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(0, n, ROWS):
            rows = r0 + offs_r
            tile_mask = (rows < n)[:, None] & d_valid[None, :]
            x = tl.load(hidden_ptr + (start + rows)[:, None] * d + offs_d[None, :], mask=tile_mask, other=0.0)
            total += tl.sum(x.to(tl.float32), axis=0)
        pooled = (total / n.to(tl.float32)).to(dtype).to(tl.float32)
        w1_mask = w_valid[:, None] & d_valid[None, :]
        w1 = tl.load(w1_ptr + offs_w[:, None] * d + offs_d[None, :], mask=w1_mask, other=0.0).to(tl.float32)
        pre += tl.sum(w1 * pooled[None, :], axis=1)
    pre = (pre + tl.load(b1_ptr + offs_w, mask=w_valid, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    decay = tl.exp(-2.0 * tl.abs(pre))
    magnitude = (1.0 - decay) / (1.0 + decay)
    hidden_units = tl.where(pre < 0.0, -magnitude, magnitude).to(dtype).to(tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < classes
    w2_mask = c_valid[:, None] & w_valid[None, :]
    w2 = tl.load(w2_ptr + offs_c[:, None] * width + offs_w[None, :], mask=w2_mask, other=0.0).to(tl.float32)
    z = tl.sum(w2 * hidden_units[None, :], axis=1) + tl.load(b2_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
    z = z.to(dtype)
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
) -> None:
    """Validated inputs as in ``exit_step``; one launch, updates ``logits``, ``exit_layer`` and ``alive``."""
    d = hidden.shape[1]
    width, classes = dense_weight.shape[0], classifier_weight.shape[0]
    batch = alive.shape[0]
    _exit_step_kernel[(batch,)](
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
        d,
        width,
        classes,
        layer,
        1.0 / math.log(classes),
        HAS_SCHEDULE=schedule is not None,
        BLOCK_D=BLOCK_D,
        BLOCK_W=max(triton.next_power_of_2(width), 16),
        BLOCK_C=max(triton.next_power_of_2(classes), 16),
        ROWS=ROWS,
    )
