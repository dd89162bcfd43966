"""PyTorch implementation of ``compact_tokens``: the CPU backend and the tests' oracle.

Vectorised over tokens; it reads the live token count back (one host synchronisation on a GPU) to index the
live rows, which the Triton backend never does.
"""

from __future__ import annotations

import torch


def keep_rule_torch(
    cu_seqlens: torch.Tensor,
    keep: torch.Tensor | None,
    importance: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep_first: bool,
    alive: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compact_tokens``' token rule (see its module docstring): the one place it is written in PyTorch.

    Returns ``chosen`` bool ``(live,)`` (whether each of the first ``live = cu_seqlens[-1]`` rows stays) and each
    row's slot, int64 ``(live,)``. Reads ``live`` back (a host synchronisation on a GPU).
    """
    device = cu_seqlens.device
    bounds = cu_seqlens.long()
    lengths = bounds[1:] - bounds[:-1]
    live = int(bounds[-1])
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=live)
    chosen = torch.ones(live, dtype=torch.bool, device=device)
    if keep is not None:
        chosen &= keep[:live]
    if importance is not None:
        per_sequence = threshold / lengths.clamp(min=1).to(threshold.dtype)
        chosen &= (threshold <= 0) | ~(importance[:live] <= per_sequence[sequence])
    if keep_first:
        chosen |= torch.arange(live, device=device) == bounds[sequence]
    if alive is not None:
        chosen &= alive[sequence]
    return chosen, sequence


def compact_tokens_torch(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    keep: torch.Tensor | None,
    importance: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep_first: bool,
    alive: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs as in ``compact_tokens``; returns ``(hidden_out, cu_seqlens_out)``.

    Rows of ``hidden_out`` past the kept ones are zero.
    """
    chosen, sequence = keep_rule_torch(cu_seqlens, keep, importance, threshold, keep_first, alive)
    per_sequence_kept = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int64, device=hidden.device)
    per_sequence_kept.index_add_(0, sequence, chosen.long())
    cu_out = torch.zeros_like(cu_seqlens)
    cu_out[1:] = per_sequence_kept.cumsum(0)
    hidden_out = torch.zeros_like(hidden)
    rows = chosen.nonzero().squeeze(1)
    hidden_out[: rows.numel()] = hidden[rows]
    if counts is not None:
        counts.copy_(per_sequence_kept)
    return hidden_out, cu_out
