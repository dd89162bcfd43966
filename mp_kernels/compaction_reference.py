"""PyTorch implementations of ``prune_tokens``, ``drop_sequences`` and ``scatter_rows``: the CPU backend and
the tests' oracle.

Everything is vectorised over tokens and sequences. The keep decisions, counts and prefix sums stay on the
device; the sizes of the outputs come back to the host in one copy (``stats.tolist()``), and the kept rows are
then listed with ``torch.nonzero_static``, which needs no further synchronisation on a GPU.
``scatter_rows_torch`` indexes with the boolean mask, which on a GPU reads the mask once.
"""

from __future__ import annotations

import torch


def prune_tokens_torch(
    hidden: torch.Tensor,
    importance: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: float | torch.Tensor,
    keep_first: bool,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Validated inputs as in ``prune_tokens``; returns ``(hidden_kept, cu_seqlens_kept, max_seqlen_kept,
    kept_index)``.

    The threshold is compared in ``importance``'s dtype (a Python float is rounded to it, as PyTorch does), as
    ``not importance <= threshold``, so that a NaN on either side keeps the token. The first tokens are marked
    through ``cu_seqlens[:-1]`` directly: an empty sequence's offset is the next sequence's first token, or the
    spare slot past the end of the mask.
    """
    total = hidden.shape[0]
    bounds = cu_seqlens.long()
    if isinstance(threshold, torch.Tensor):
        lengths = bounds[1:] - bounds[:-1]
        threshold = torch.repeat_interleave(threshold.to(importance.dtype), lengths, output_size=total)
    keep = torch.zeros(total + 1, dtype=torch.bool, device=hidden.device)
    torch.le(importance, threshold, out=keep[:total])
    keep[:total].logical_not_()
    if keep_first:
        keep.index_fill_(0, bounds[:-1], True)
    keep = keep[:total]
    kept_before = torch.zeros(total + 1, dtype=torch.int64, device=hidden.device)
    torch.cumsum(keep, dim=0, out=kept_before[1:])
    cu_kept = kept_before[bounds]
    counts = cu_kept[1:] - cu_kept[:-1]
    total_kept, max_seqlen_kept = torch.stack([kept_before[-1], counts.max()]).tolist()
    kept_index = torch.nonzero_static(keep, size=total_kept).squeeze(1)
    return hidden.index_select(0, kept_index), cu_kept.to(torch.int32), max_seqlen_kept, kept_index


def drop_sequences_torch(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: torch.Tensor,
    seq_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Validated inputs as in ``drop_sequences``; returns ``(hidden_kept, cu_seqlens_kept, max_seqlen_kept,
    seq_index_kept)``."""
    total = hidden.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    kept_lengths = torch.where(keep, lengths, 0)
    stats = torch.stack([kept_lengths.sum(), kept_lengths.max(), keep.sum()])
    total_kept, max_seqlen_kept, n_kept = stats.tolist()
    kept_rows = torch.nonzero_static(keep, size=n_kept).squeeze(1)
    cu_kept = torch.zeros(n_kept + 1, dtype=torch.int32, device=hidden.device)
    torch.cumsum(lengths[kept_rows], dim=0, dtype=torch.int32, out=cu_kept[1:])
    token_keep = torch.repeat_interleave(keep, lengths, output_size=total)
    token_rows = torch.nonzero_static(token_keep, size=total_kept).squeeze(1)
    return hidden.index_select(0, token_rows), cu_kept, max_seqlen_kept, seq_index[kept_rows]


def scatter_rows_torch(out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Validated inputs as in ``scatter_rows``; writes ``rows[mask]`` into ``out[index[mask]]`` and returns ``out``."""
    out[index[mask]] = rows[mask]
    return out
