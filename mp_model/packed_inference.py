"""The packed inference loop: real removal of pruned tokens and exited sequences, layer by layer.

The padded batch is unpadded once to the packed layout (``cu_seqlens``). At each layer: attention (with token
importance where that layer prunes) -> removal of low-importance tokens after the attention block, before the
feed-forward (LTP's placement) -> feed-forward -> sub-classifier on the mean of each remaining sequence's
tokens -> entropy exit test -> removal of the exited sequences, whose logits are written to their original rows.
Everything stays on the device; each compaction reads back one small tensor to size its output.

Per-layer overhead is kept low for small batches (measured in ``bench/NOTES.md``, "CPU path"): Q, K and V are one
matmul on a fused weight; on a CPU in float32 the projections run through oneDNN on pre-packed weights with the
bias, GELU and residual add fused (``mp_model.fused_weights``); with the PyTorch kernels, while every remaining
sequence has the same length (always at batch 1), attention runs on views of the fused projection without the
varlen bucketing and a single sequence is pruned with one comparison; layers whose threshold is 0 compute no
importance; exits are counted once per layer on the host, and no compaction runs when no sequence exits;
profiler ranges are opened only while a profiler runs.

With ``use_ort`` (the model's default on a CPU in float32), a lone sequence of at most ``ORT_MAX_TOKENS`` tokens
leaves this loop for ONNX Runtime (``mp_model.lone_sequence``): at batch size 1 from its token ids, else from the
layer where every other sequence has exited or pruning brought it under the limit. That is where the
per-operator overhead above dominated; batches of several sequences and long sequences keep the loop, whose time
is in GEMMs over many rows.

``PackedEngine`` is this loop as an ``mp_model.engine.Engine`` (``use_ort``: the ONNX Runtime engine). The GPU
engine (``mp_model.graph_engine``) runs the same six steps (unpad, project, attend, add and normalise, prune, exit
and drop) and both are tested against ``mp_model.reference``; they are written separately because their operations
differ at every step: this loop sizes each tensor from the host (a count read back per compaction, tokens and
sequences really removed), the graph engine keeps fixed-capacity buffers sized by a bucket and fuses steps this loop
cannot (the move of kept rows into the normalisation, the pruning decision into the importance pass). The knobs
(``mp_model.knobs``) and the rules they feed (which layers prune, the exit test) are shared, not re-derived.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from mp_kernels import drop_sequences, entropy_exit, prune_tokens, scatter_rows, varlen_attention
from mp_kernels.dispatch import choose_backend
from mp_model.config import MagicPyramidConfig
from mp_model.engine import ModelParts
from mp_model.exit_head import exit_logits
from mp_model.flops import flops_from_outputs, sequence_flops
from mp_model.fused_weights import LayerProjections, packed_path_weights
from mp_model.knobs import ResolvedKnobs
from mp_model.lone_sequence import LoneResult, run_lone_sequence
from mp_model.ort_layers import OrtLayers, ort_layers
from mp_model.outputs import MagicPyramidOutput

# A lone sequence goes to ONNX Runtime once it has at most this many tokens. Above it the PyTorch loop is as fast
# or faster (MiniLM, one thread, batch 1: dense 0.91-0.96x ORT's time from 128 to 512 tokens, its per-operator
# overhead then negligible; 0.82x at 32 tokens; bench/NOTES.md, "CPU path").
ORT_MAX_TOKENS = 128


def segment_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(sequences, d)``: the mean of each packed sequence's rows of ``hidden`` ``(tokens, d)``, summed in at least
    float32 and returned in ``hidden``'s dtype."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=hidden.device), lengths, output_size=hidden.shape[0]
    )
    wide = torch.promote_types(hidden.dtype, torch.float32)  # CUDA's index_add_ rounds every atomic add
    sums = hidden.new_zeros(lengths.numel(), hidden.shape[1], dtype=wide).index_add_(0, sequence, hidden.to(wide))
    return (sums / lengths.unsqueeze(1).to(wide)).to(hidden.dtype)


_NO_RANGE = contextlib.nullcontext()


def _stage(name: str) -> contextlib.AbstractContextManager:
    """``record_function(name)`` while a profiler runs, else a no-op (a range costs about 5 us even unprofiled)."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else _NO_RANGE


def uniform_attention(
    qkv: torch.Tensor, sequences: int, heads: int, scale: float, return_importance: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``sequences`` packed sequences of one length, on the fused projection ``qkv`` ``(tokens, 3d)``.

    Computes what ``varlen_attention``'s PyTorch reference computes for a bucket without padding, on views of
    ``qkv`` (no gather, no bucketing): returns the context ``(tokens, d)`` and, with ``return_importance``, each
    token's importance ``(tokens,)`` in float32 (float64 for float64 inputs).
    """
    tokens = qkv.shape[0]
    length = tokens // sequences
    head_dim = qkv.shape[1] // (3 * heads)
    q, k, v = qkv.view(sequences, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if not return_importance:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(tokens, heads * head_dim), None
    probs = torch.matmul(q * scale, k.transpose(-1, -2)).softmax(dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(tokens, heads * head_dim)
    return out, (probs.sum(dim=(1, 2)) / (heads * length)).reshape(tokens)


def per_token_threshold(threshold: float, length: int, dtype: torch.dtype) -> float:
    """``threshold / length`` rounded as ``prune_tokens``' caller computes it in ``dtype`` (float32 unless float64)."""
    if dtype == torch.float64:
        return threshold / length
    return float(np.float32(threshold) / np.float32(length))


def _torch_layer(
    layer: torch.nn.Module,
    weights: LayerProjections,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    uniform: int | None,
    alive: int,
    threshold: float,
    prunes: bool,
    heads: int,
    backend: str | None,
    inline: bool,
) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """One encoder layer with PyTorch operators (and ``mp_kernels``) on the packed ``hidden`` ``(tokens, d)`` of
    ``alive`` sequences of ``heads`` attention heads; prunes with ``threshold`` where ``prunes``; ``inline``: the
    PyTorch kernels in float32 or float64, where the single-length shortcuts apply.

    ``uniform`` is the length every sequence has, or None; ``cu_seqlens`` stays exact except after a lone
    sequence's inline pruning (nothing reads it afterwards). Returns ``(hidden, cu_seqlens, max_seqlen, uniform)``.
    """
    tokens = hidden.shape[0]
    with _stage("mp.qkv"):
        qkv = weights.qkv(hidden)
    with _stage("mp.attention"):
        if inline and uniform is not None:
            scale = (hidden.shape[1] // heads) ** -0.5
            context, importance = uniform_attention(qkv, alive, heads, scale, prunes)
        else:
            q, k, v = qkv.view(tokens, 3, heads, -1).unbind(1)
            result = varlen_attention(
                q, k, v, cu_seqlens, max_seqlen, return_importance=prunes, backend=backend, validate=False
            )
            context, importance = result if prunes else (result, None)
    with _stage("mp.attention_output"):
        norm = layer.attention.output.LayerNorm
        attended = weights.attention_output(context.reshape(tokens, -1), residual=hidden)
        attended = F.layer_norm(attended, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    if prunes:
        with _stage("mp.prune"):
            if inline and alive == 1:
                keep = importance > per_token_threshold(threshold, tokens, importance.dtype)
                keep[0] = True
                attended = attended.index_select(0, keep.nonzero().squeeze(1))
                uniform = max_seqlen = attended.shape[0]
            else:
                uniform = None
                per_sequence = threshold / (cu_seqlens[1:] - cu_seqlens[:-1]).to(importance.dtype)
                attended, cu_seqlens, max_seqlen, _ = prune_tokens(
                    attended, importance, cu_seqlens, per_sequence, keep_first=True, backend=backend, validate=False
                )
                if alive == 1:
                    uniform = attended.shape[0]
    with _stage("mp.feed_forward"):
        norm = layer.output.LayerNorm
        hidden = weights.output(weights.intermediate(attended), residual=attended)
        hidden = F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return hidden, cu_seqlens, max_seqlen, uniform


def _run_lone(
    start: int,
    inputs: torch.Tensor,
    row: int,
    logits: torch.Tensor,
    exit_layer: torch.Tensor,
    kept_tokens: torch.Tensor,
    every_exit_logits: torch.Tensor | None,
    runner: OrtLayers,
    knobs: ResolvedKnobs,
) -> None:
    """Layers ``start`` onwards of the lone sequence of batch row ``row`` (``run_lone_sequence``), its results
    written to that row of the outputs."""
    result = run_lone_sequence(runner, start, inputs, knobs, knobs.exit_after(row), every_exit_logits is not None)
    logits[row] = result.logits[0]
    exit_layer[row] = result.exit_layer
    kept_tokens[row, start:] = result.counts
    if every_exit_logits is not None and result.exit_logits is not None:
        every_exit_logits[row, start:] = result.exit_logits


class PackedEngine:
    """The packed engine (``mp_model.engine.Engine``): ``packed_forward`` on ``parts``; with ``use_ort`` (float32 on
    a CPU, ``mp_model.ort_layers.supports``) a lone sequence's layers run in ONNX Runtime (the ORT engine)."""

    def __init__(self, parts: ModelParts, *, use_ort: bool = False) -> None:
        self.parts = parts
        self.use_ort = use_ort

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        knobs: ResolvedKnobs,
        *,
        max_length: int | None = None,
        return_exit_logits: bool = False,
        lone_length: int | None = None,
    ) -> MagicPyramidOutput:
        """``packed_forward`` of the inputs (see there for the keyword arguments)."""
        return packed_forward(
            self.parts,
            input_ids,
            attention_mask,
            token_type_ids,
            knobs,
            max_length=max_length,
            return_exit_logits=return_exit_logits,
            use_ort=self.use_ort,
            lone_length=lone_length,
        )


@torch.no_grad()
def packed_forward(
    parts: ModelParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    knobs: ResolvedKnobs,
    *,
    max_length: int | None = None,
    return_exit_logits: bool = False,
    use_ort: bool = False,
    lone_length: int | None = None,
) -> MagicPyramidOutput:
    """Run validated inputs ``(batch, seq)``, each row's real tokens first, through the model's ``parts`` with
    ``knobs``; see ``MagicPyramidForSequenceClassification.forward``.

    ``max_length`` is the longest row's real length (known to the caller from validation; None: the input's
    width). ``knobs.exit_schedule``, if given, replaces the entropy test: example ``i`` exits after layer
    ``exit_schedule[i]`` (its sub-classifier still runs), for benchmarks that replay a measured exit pattern.
    ``return_exit_logits`` runs every sub-classifier on every example still present and returns their logits
    (``MagicPyramidOutput.exit_logits``), for evaluations that simulate early exit offline. ``use_ort`` (float32 on
    a CPU, ``mp_model.ort_layers.supports``) runs a lone sequence of at most ``ORT_MAX_TOKENS`` tokens through ONNX
    Runtime (``mp_model.lone_sequence``): at batch size 1 from its token ids on, else from the first layer it
    enters alone and short enough. ``lone_length``: at batch size 1, the row's real length where the caller knows
    it (from validation), else None (read from the mask).

    While a profiler runs, each stage runs inside a ``torch.profiler.record_function`` range named ``mp.<stage>``
    (``qkv``, ``attention``, ``attention_output``, ``prune``, ``feed_forward``, ``exit_head``, ``exit_test``,
    ``drop``, ``classifier``, and ``ort_layers`` for a lone sequence's ONNX Runtime sessions), so a profiler run
    splits the time per stage.
    """
    config = parts.config
    bert = parts.bert
    batch, width = input_ids.shape
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    device = input_ids.device
    max_length = width if max_length is None else max_length
    tau, early_exit, backend, exit_schedule = knobs.tau, knobs.early_exit, knobs.backend, knobs.exit_schedule

    dtype = bert.embeddings.word_embeddings.weight.dtype
    thresholds, prune_layers = knobs.thresholds, knobs.prune_layers
    # A lone sequence (here at batch size 1, or once the others exited) runs through ONNX Runtime sessions.
    runner = ort_layers(parts) if use_ort else None
    # At batch size 1 the row's real tokens come first (the caller moved any left padding right).
    if runner is not None and batch == 1 and (n := lone_length or int(attention_mask.sum())) <= ORT_MAX_TOKENS:
        # numpy's slicing costs a fraction of torch's on one small row (bench/NOTES.md, "CPU path").
        ids = input_ids.numpy()[0, :n].astype(np.int64, copy=False)
        types = np.zeros_like(ids) if token_type_ids is None else token_type_ids.numpy()[0, :n].astype(np.int64)
        with _stage("mp.ort_layers"):
            result = run_lone_sequence(runner, 0, (ids, types), knobs, knobs.exit_after(0), return_exit_logits)
        return _lone_output(config, n, result, return_exit_logits, early_exit)

    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    logits = torch.empty(batch, config.num_labels, dtype=dtype, device=device)
    exit_layer = torch.full((batch,), layers, dtype=torch.int64, device=device)
    kept_tokens = torch.zeros(batch, layers, dtype=torch.int64, device=device)
    every_exit_logits = None
    if return_exit_logits:
        shape = (batch, max(layers - 1, 0), config.num_labels)
        every_exit_logits = torch.full(shape, float("nan"), dtype=dtype, device=device)
    inline = choose_backend(backend, device) == "torch" and dtype in (torch.float32, torch.float64)
    outputs = (logits, exit_layer, kept_tokens, every_exit_logits)

    projections = packed_path_weights(parts).layers
    embeddings = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    rows = attention_mask.reshape(-1).nonzero().squeeze(1)
    hidden = embeddings.reshape(batch * width, -1).index_select(0, rows)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = max_length
    seq_index = torch.arange(batch, device=device)
    alive = batch
    # The length every remaining sequence has, while they all have one (the PyTorch path then needs no varlen
    # machinery), else None. ``cu_seqlens`` stays exact except after a lone sequence's inline pruning, after which
    # nothing reads it.
    uniform = hidden.shape[0] // batch if hidden.shape[0] == batch * max_length else None
    with_heads = early_exit or return_exit_logits

    for index, layer in enumerate(bert.encoder.layer):
        if runner is not None and alive == 1 and hidden.shape[0] <= ORT_MAX_TOKENS:
            row = int(seq_index[0])
            with _stage("mp.ort_layers"):
                _run_lone(index, hidden, row, *outputs, runner, knobs)
            break
        state = (hidden, cu_seqlens, max_seqlen, uniform, alive, thresholds[index], prune_layers[index], heads)
        hidden, cu_seqlens, max_seqlen, uniform = _torch_layer(layer, projections[index], *state, backend, inline)
        kept_tokens[seq_index, index] = uniform if uniform is not None else (cu_seqlens[1:] - cu_seqlens[:-1]).long()

        if index < layers - 1 and with_heads:
            with _stage("mp.exit_head"):
                if uniform is not None:
                    pooled = hidden.view(alive, uniform, -1).mean(dim=1)
                else:
                    pooled = segment_mean(hidden, cu_seqlens)
                head_logits = exit_logits(parts.exits[index], pooled)
        if index < layers - 1 and every_exit_logits is not None:
            every_exit_logits[seq_index, index] = head_logits
        if early_exit and index < layers - 1:
            with _stage("mp.exit_test"):
                if exit_schedule is None:
                    exits, _ = entropy_exit(head_logits, tau, backend=backend, validate=False)
                else:
                    exits = exit_schedule.index_select(0, seq_index) == index + 1
                leaving = int(exits.sum())
                if leaving == alive:
                    logits.index_copy_(0, seq_index, head_logits)
                    exit_layer.index_fill_(0, seq_index, index + 1)
                elif leaving:
                    scatter_rows(logits, head_logits, seq_index, exits, backend=backend, validate=False)
                    scatter_rows(exit_layer, torch.full_like(seq_index, index + 1), seq_index, exits, validate=False)
            if leaving == alive:
                break
            if leaving:
                with _stage("mp.drop"):
                    hidden, cu_seqlens, max_seqlen, seq_index = drop_sequences(
                        hidden, cu_seqlens, ~exits, seq_index, backend=backend, validate=False
                    )
                    alive -= leaving
                    if alive == 1:
                        uniform = hidden.shape[0]
    else:
        with _stage("mp.classifier"):
            first = hidden[::uniform] if uniform is not None else hidden.index_select(0, cu_seqlens[:-1].long())
            logits.index_copy_(0, seq_index, parts.classifier(bert.pooler.activation(bert.pooler.dense(first))))
    return _output(config, outputs, lengths, early_exit)


def _lone_output(
    config: MagicPyramidConfig, length: int, result: LoneResult, return_exit_logits: bool, early_exit: bool
) -> MagicPyramidOutput:
    """The model's output for a batch of one sequence of ``length`` tokens that ran entirely in ONNX Runtime (its
    FLOPs by ``sequence_flops``, from host integers)."""
    every_exit_logits = result.exit_logits[None] if return_exit_logits else None
    flops = sequence_flops(config, length, result.counts.tolist(), result.exit_layer, early_exit=early_exit)
    return MagicPyramidOutput(
        logits=result.logits,
        # torch.from_numpy of a numpy array: about half torch.tensor's time with cold caches (bench/NOTES.md).
        exit_layer=torch.from_numpy(np.array([result.exit_layer], dtype=np.int64)),
        kept_tokens=result.counts[None],
        flops=torch.from_numpy(np.array([flops], dtype=np.int64)),
        exit_logits=every_exit_logits,
    )


def _output(
    config: MagicPyramidConfig,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    lengths: torch.Tensor,
    early_exit: bool,
) -> MagicPyramidOutput:
    """The model's output from ``(logits, exit_layer, kept_tokens, every_exit_logits)``, with each example's FLOPs."""
    logits, exit_layer, kept_tokens, every_exit_logits = outputs
    flops = flops_from_outputs(config, lengths, kept_tokens, exit_layer, early_exit=early_exit)
    return MagicPyramidOutput(
        logits=logits, exit_layer=exit_layer, kept_tokens=kept_tokens, flops=flops, exit_logits=every_exit_logits
    )
