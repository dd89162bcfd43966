"""PyTorch implementation of ``exit_step``: the CPU backend and the tests' oracle.

The pooling is the packed path's segment mean (``index_add_`` accumulating in at least float32, as the kernel
does, then rounded to ``hidden``'s dtype), the head is ``ExitClassifier``'s arithmetic and the test
``entropy_exit_torch``, so in float64 it is bitwise the packed path.
It reads the live token count back once (a host synchronisation on a GPU). ``exit_step``'s ``max_seqlen`` only
sizes the Triton grid, so this path does not take it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mp_kernels.early_exit_reference import entropy_exit_torch


def exit_step_torch(
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
    """Validated inputs as in ``exit_step``; updates ``logits``, ``exit_layer`` and ``alive`` in place."""
    bounds = cu_seqlens.long()
    lengths = bounds[1:] - bounds[:-1]
    live = int(bounds[-1])
    batch = lengths.numel()
    sequence = torch.repeat_interleave(torch.arange(batch, device=hidden.device), lengths, output_size=live)
    wide = torch.promote_types(hidden.dtype, torch.float32)  # CUDA's index_add_ rounds every atomic add
    sums = hidden.new_zeros(batch, hidden.shape[1], dtype=wide).index_add_(0, sequence, hidden[:live].to(wide))
    pooled = (sums / lengths.clamp(min=1).unsqueeze(1).to(wide)).to(hidden.dtype)
    head = F.linear(torch.tanh(F.linear(pooled, dense_weight, dense_bias)), classifier_weight, classifier_bias)
    candidates = alive & (lengths > 0)
    if schedule is None:
        _, uncertainty = entropy_exit_torch(head, 0.0)
        exits = candidates & (uncertainty <= tau)
    else:
        exits = candidates & (schedule == layer)
    logits.copy_(torch.where(exits[:, None], head, logits))
    exit_layer.masked_fill_(exits, layer)
    alive &= ~exits
