"""Triton kernel for ``finish_slots``: one launch, one program per slot, nothing read back.

Program ``b`` first settles its slot's outcome. A slot still running with tokens left reads its first token's row
and walks the pooler's output features in blocks of ``BLOCK_N``: each block's pre-activation
``W_p[block] @ x + b_p[block]`` accumulates in float32 over the input features in steps of ``BLOCK_K``, is rounded
to the model's dtype, goes through tanh (through ``exp``: ``sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})``) and is
rounded again, and is folded at once into the classifier's float32 accumulators ``W_c[:, block] @ pooled[block]``
(``BLOCK_C >= classes``), so the pooled vector is never stored; the logits get the bias and one rounding. A
padding slot writes zero logits. Both write ``exit_layer = layers``.

Then, in registers and int64, the program walks the layers (unrolled: the prune pattern is a compile-time
bitmask): a pruning layer's kept count is read, a non-pruning layer's is the count entering it (or 0 once the slot
has exited) and is written; each layer the slot ran adds its attention and feed-forward FLOPs, and the
sub-classifiers and main classifier are added last. Each value is written once and never read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels._triton.rows_linear import activate
from mp_kernels._triton.segments import segment

BLOCK_N = 32
BLOCK_K = 128
COEFFICIENT_ARGUMENTS = ["attention_linear", "attention_quadratic", "feed_forward", "exit_head", "main_head"]


@triton.jit(do_not_specialize=COEFFICIENT_ARGUMENTS)  # a coefficient of 1 would become a constexpr, without .to()
def _finish_slots_kernel(
    hidden_ptr,
    cu_ptr,
    pw_ptr,
    pb_ptr,
    cw_ptr,
    cb_ptr,
    alive_ptr,
    lengths_ptr,
    logits_ptr,
    exit_layer_ptr,
    kept_ptr,
    flops_ptr,
    batch,
    rows_total,
    d,
    classes,
    attention_linear,
    attention_quadratic,
    feed_forward,
    exit_head,
    main_head,
    LAYERS: tl.constexpr,
    PRUNES: tl.constexpr,
    EARLY_EXIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Shapes as in ``finish_slots``; ``PRUNES`` has bit ``i`` set iff layer ``i`` prunes. The slot's rows come
    from ``segment``, clamped into the ``rows_total`` rows of ``hidden``."""
    slot = tl.program_id(0)
    length = tl.load(lengths_ptr + slot)
    start, size = segment(cu_ptr, slot, rows_total)
    padding = length == 0
    finished = (tl.load(alive_ptr + slot) != 0) & (size > 0) & (length != 0)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < classes
    logits_ptrs = logits_ptr + slot * classes + offs_c
    if finished:
        dtype = hidden_ptr.dtype.element_ty
        row_ptr = hidden_ptr + start.to(tl.int64) * d
        z = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, d, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_valid = offs_n < d
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_valid = offs_k < d
                x = tl.load(row_ptr + offs_k, mask=k_valid, other=0.0).to(tl.float32)
                w_ptrs = pw_ptr + offs_n.to(tl.int64)[:, None] * d + offs_k[None, :]
                w = tl.load(w_ptrs, mask=n_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
            pre = (acc + tl.load(pb_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            pooled = activate(pre, "tanh").to(dtype).to(tl.float32)
            wc_ptrs = cw_ptr + offs_c[:, None] * d + offs_n[None, :]
            wc = tl.load(wc_ptrs, mask=c_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
            z += tl.sum(wc * pooled[None, :], axis=1)
        z += tl.load(cb_ptr + offs_c, mask=c_valid, other=0.0).to(tl.float32)
        tl.store(logits_ptrs, z.to(dtype), mask=c_valid)
    elif padding:
        tl.store(logits_ptrs, tl.zeros([BLOCK_C], dtype=tl.float32).to(logits_ptr.dtype.element_ty), mask=c_valid)
    settled = finished | padding
    exits = tl.where(settled, LAYERS, tl.load(exit_layer_ptr + slot, mask=~settled, other=0)).to(tl.int64)
    tl.store(exit_layer_ptr + slot, exits, mask=settled)
    total = tl.where(exits == LAYERS, main_head.to(tl.int64), 0)
    if EARLY_EXIT:
        total += exit_head.to(tl.int64) * tl.minimum(exits, LAYERS - 1)
    entering = length
    for i in tl.static_range(LAYERS):
        kept_here = kept_ptr + i * batch + slot
        if (PRUNES >> i) & 1:
            kept = tl.load(kept_here)
        else:
            kept = tl.where(exits > i, entering, 0)
            tl.store(kept_here, kept)
        layer = attention_linear.to(tl.int64) * entering + attention_quadratic.to(tl.int64) * entering * entering
        layer += feed_forward.to(tl.int64) * kept
        total += tl.where(exits > i, layer, 0)
        entering = kept
    tl.store(flops_ptr + slot, total)


def finish_slots_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    alive: torch.Tensor,
    lengths: torch.Tensor,
    logits: torch.Tensor,
    exit_layer: torch.Tensor,
    kept: torch.Tensor,
    flops: torch.Tensor,
    prunes: tuple[bool, ...],
    coefficients: tuple[int, int, int, int, int],
    early_exit: bool,
) -> None:
    """Validated inputs as in ``finish_slots``; one launch of ``batch`` programs, updates the outputs in place."""
    layers, batch = kept.shape
    classes = classifier_weight.shape[0]
    _finish_slots_kernel[(batch,)](
        hidden,
        cu_seqlens,
        pooler_weight,
        pooler_bias,
        classifier_weight,
        classifier_bias,
        alive,
        lengths,
        logits,
        exit_layer,
        kept,
        flops,
        batch,
        hidden.shape[0],
        hidden.shape[1],
        classes,
        *coefficients,
        LAYERS=layers,
        PRUNES=sum(1 << i for i, prunes_here in enumerate(prunes) if prunes_here),
        EARLY_EXIT=early_exit,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_C=max(triton.next_power_of_2(classes), 16),
    )
