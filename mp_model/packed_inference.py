"""The packed inference loop: real removal of pruned tokens and exited sequences, layer by layer.

The padded batch is unpadded once to the packed layout (``cu_seqlens``). At each layer: attention (with token
importance where that layer prunes) -> removal of low-importance tokens after the attention block, before the
feed-forward (LTP's placement) -> feed-forward -> sub-classifier on the mean of each remaining sequence's
tokens -> entropy exit test -> removal of the exited sequences, whose logits are written to their original rows.
Everything stays on the device; each compaction reads back one small tensor to size its output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from mp_kernels import drop_sequences, entropy_exit, prune_tokens, scatter_rows, varlen_attention
from mp_model.flops import flops_from_outputs
from mp_model.outputs import MagicPyramidOutput

if TYPE_CHECKING:
    from mp_model.modeling import MagicPyramidForSequenceClassification


def segment_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(sequences, d)``: the mean of each packed sequence's rows of ``hidden`` ``(tokens, d)``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=hidden.device), lengths, output_size=hidden.shape[0]
    )
    sums = hidden.new_zeros(lengths.numel(), hidden.shape[1]).index_add_(0, sequence, hidden)
    return sums / lengths.unsqueeze(1).to(hidden.dtype)


@torch.no_grad()
def packed_forward(
    model: MagicPyramidForSequenceClassification,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    *,
    max_length: int,
    tau: float,
    threshold_scale: float,
    prune: bool,
    early_exit: bool,
    backend: str | None = None,
    exit_schedule: torch.Tensor | None = None,
) -> MagicPyramidOutput:
    """Run validated inputs ``(batch, seq)`` through the model; see ``MagicPyramidForSequenceClassification``.

    ``max_length`` is the longest row's real length (known to the caller from validation). ``exit_schedule``
    ``(batch,)`` int64, if given, replaces the entropy test: example ``i`` exits after layer
    ``exit_schedule[i]`` (its sub-classifier still runs), for benchmarks that replay a measured exit pattern.

    Each stage runs inside a ``torch.profiler.record_function`` range named ``mp.<stage>`` (``qkv``,
    ``attention``, ``attention_output``, ``prune``, ``feed_forward``, ``exit_head``, ``exit_test``, ``drop``,
    ``classifier``), so a profiler run splits the time per stage.
    """
    config = model.config
    bert = model.bert
    batch, width = input_ids.shape
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    device = input_ids.device

    embeddings = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    rows = attention_mask.reshape(-1).nonzero().squeeze(1)
    hidden = embeddings.reshape(batch * width, -1).index_select(0, rows)
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = max_length
    seq_index = torch.arange(batch, device=device)

    logits = torch.empty(batch, config.num_labels, dtype=hidden.dtype, device=device)
    exit_layer = torch.full((batch,), layers, dtype=torch.int64, device=device)
    kept_tokens = torch.zeros(batch, layers, dtype=torch.int64, device=device)
    thresholds = (model.thresholds.detach().double() * threshold_scale).tolist() if prune else [0.0] * layers

    for index, layer in enumerate(bert.encoder.layer):
        self_attention = layer.attention.self
        tokens = hidden.shape[0]
        n_attention = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        with record_function("mp.qkv"):
            q, k, v = (
                projection(hidden).view(tokens, heads, head_dim)
                for projection in (self_attention.query, self_attention.key, self_attention.value)
            )
        prunes = thresholds[index] > 0.0
        with record_function("mp.attention"):
            result = varlen_attention(
                q, k, v, cu_seqlens, max_seqlen, return_importance=prunes, backend=backend, validate=False
            )
        context, importance = result if prunes else (result, None)
        with record_function("mp.attention_output"):
            attended = layer.attention.output(context.reshape(tokens, -1), hidden)
        if prunes:
            with record_function("mp.prune"):
                per_sequence = thresholds[index] / n_attention.to(importance.dtype)
                attended, cu_seqlens, max_seqlen, _ = prune_tokens(
                    attended, importance, cu_seqlens, per_sequence, keep_first=True, backend=backend, validate=False
                )
        n_feed_forward = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        with record_function("mp.feed_forward"):
            hidden = layer.output(layer.intermediate(attended), attended)
        kept_tokens[seq_index, index] = n_feed_forward

        if early_exit and index < layers - 1:
            with record_function("mp.exit_head"):
                exit_logits = model.exits[index](segment_mean(hidden, cu_seqlens))
            with record_function("mp.exit_test"):
                if exit_schedule is None:
                    exits, _ = entropy_exit(exit_logits, tau, backend=backend, validate=False)
                else:
                    exits = exit_schedule.index_select(0, seq_index) == index + 1
                scatter_rows(logits, exit_logits, seq_index, exits, backend=backend, validate=False)
                scatter_rows(exit_layer, torch.full_like(seq_index, index + 1), seq_index, exits, validate=False)
            with record_function("mp.drop"):
                hidden, cu_seqlens, max_seqlen, seq_index = drop_sequences(
                    hidden, cu_seqlens, ~exits, seq_index, backend=backend, validate=False
                )
            if seq_index.numel() == 0:
                break
    else:
        with record_function("mp.classifier"):
            first_tokens = hidden.index_select(0, cu_seqlens[:-1].long())
            pooled = bert.pooler.activation(bert.pooler.dense(first_tokens))
            logits.index_copy_(0, seq_index, model.classifier(pooled))
    flops = flops_from_outputs(config, lengths, kept_tokens, exit_layer, early_exit=early_exit)
    return MagicPyramidOutput(logits=logits, exit_layer=exit_layer, kept_tokens=kept_tokens, flops=flops)
