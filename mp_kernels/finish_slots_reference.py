"""PyTorch ``finish_slots``: the CPU backend and the tests' oracle.

The pooler and classifier are ``F.linear`` and ``torch.tanh`` in the model's dtype, as HF's ``BertPooler`` and the
classification layer compute them; the kept counts and FLOPs are integer tensor arithmetic over the layers. It
computes every slot and selects with ``torch.where``: no host read, static shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def finish_slots_torch(
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
    """Validated inputs as in ``finish_slots``; updates ``logits``, ``exit_layer``, ``kept`` and ``flops`` in place."""
    layers = kept.shape[0]
    bounds = cu_seqlens.long()
    padding = lengths == 0
    finished = alive & (bounds[1:] > bounds[:-1]) & ~padding
    if hidden.shape[0] > 0:
        first = hidden.index_select(0, bounds[:-1].clamp(max=hidden.shape[0] - 1))
        head = F.linear(torch.tanh(F.linear(first, pooler_weight, pooler_bias)), classifier_weight, classifier_bias)
        logits.copy_(torch.where(finished[:, None], head, logits))
    logits.masked_fill_(padding[:, None], 0)
    exit_layer.masked_fill_(finished | padding, layers)
    entering = lengths
    for index, prunes_here in enumerate(prunes):
        if not prunes_here:
            kept[index] = torch.where(exit_layer > index, entering, 0)
        entering = kept[index]
    attention_linear, attention_quadratic, feed_forward, exit_head, main_head = coefficients
    before = torch.cat([lengths[None], kept[:-1]])
    ran = torch.arange(layers, device=kept.device)[:, None] < exit_layer[None, :]
    per_layer = attention_linear * before + attention_quadratic * before * before + feed_forward * kept
    total = (per_layer * ran).sum(dim=0) + main_head * (exit_layer == layers)
    if early_exit:
        total += exit_head * exit_layer.clamp(max=layers - 1)
    flops.copy_(total)
