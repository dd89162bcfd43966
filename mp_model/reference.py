"""The Magic Pyramid forward, stated plainly: the model's reference, which every engine is tested against.

Read this first. It runs one example at a time on its real tokens, removes tokens and stops layers explicitly, and
computes in the model's dtype with PyTorch operators: slow, and obviously the model. For an example of ``n`` real
tokens (padding on either side is dropped; positions count from its first real token):

1. embed the tokens (word + position + token type, LayerNorm: HF's ``BertEmbeddings``);
2. at each layer, attend over the tokens still present (explicit softmax probabilities, per head);
3. where the layer prunes (``knobs.prune_layers``: its threshold times ``threshold_scale`` is above 0), a token's
   importance is the attention it receives, summed over heads and query rows and divided by ``heads * n``
   (``n``: the tokens entering the layer); it stays iff its importance exceeds ``threshold / n``; the first token
   always stays. Pruned tokens leave after the attention block's add-and-normalise, before the feed-forward
   (Learned Token Pruning's placement), and never come back;
4. the feed-forward and its add-and-normalise run on the tokens that stayed (``kept_tokens`` counts them);
5. after every layer but the last, with ``knobs.early_exit``, the layer's sub-classifier reads the mean of the
   remaining tokens; the example leaves with those logits when their normalised entropy is at most ``knobs.tau``
   (NaN never is), or, with an exit schedule, after the layer the schedule names;
6. an example that never left gets the main classifier on its first token (pooler ``tanh(W x + b)``, then the
   output layer).

FLOPs are counted as ``mp_model.flops`` defines them (two per multiply-accumulate of the attention, feed-forward
and head matrix products that ran). The engines (``mp_model.engine``) compute the same function on whole batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mp_model.engine import ModelParts
from mp_model.exit_head import exit_logits
from mp_model.flops import attention_macs, exit_head_macs, feed_forward_macs, main_head_macs
from mp_model.knobs import ResolvedKnobs
from mp_model.outputs import MagicPyramidOutput


@dataclass
class SingleResult:
    """One example's result: its logits ``(labels,)``, the layers it ran, the tokens kept after each layer (0 after
    its exit), its FLOPs and, where asked for, every sub-classifier's logits ``(layers - 1, labels)`` (NaN after its
    exit)."""

    logits: torch.Tensor
    exit_layer: int
    kept_tokens: list[int]
    flops: int
    exit_logits: torch.Tensor | None = None


def uncertainty(logits: torch.Tensor) -> float:
    """The normalised entropy of ``softmax(logits)`` in [0, 1] (in float64; NaN logits give NaN)."""
    p = logits.double().softmax(dim=-1)
    return float((p * p.clamp_min(1e-300).log()).sum() / math.log(1.0 / p.numel()))


@torch.no_grad()
def reference_sequence(
    parts: ModelParts,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    knobs: ResolvedKnobs,
    exit_after: int | None = None,
    return_exit_logits: bool = False,
) -> SingleResult:
    """Run one example's real tokens ``(n,)`` through the model (module docstring).

    ``exit_after``: the example's layer in a replayed exit schedule (None: the entropy test at ``knobs.tau``).
    ``return_exit_logits``: run every sub-classifier while the example is present, also without early exit
    (their FLOPs count only where early exit runs them anyway).
    """
    config, bert = parts.config, parts.bert
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    layers = config.num_hidden_layers
    types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    x = bert.embeddings(input_ids=input_ids[None], token_type_ids=types[None])[0]
    every = torch.full((layers - 1, config.num_labels), float("nan"), dtype=x.dtype) if return_exit_logits else None
    kept: list[int] = []
    flops = 0
    for index, layer in enumerate(bert.encoder.layer):
        attention = layer.attention.self
        n = x.shape[0]
        q, k, v = (
            p(x).view(n, heads, head_dim).transpose(0, 1) for p in (attention.query, attention.key, attention.value)
        )
        probs = (q @ k.transpose(-1, -2) * attention.scaling).softmax(dim=-1)
        attended = layer.attention.output((probs @ v).transpose(0, 1).reshape(n, -1), x)
        if knobs.prune_layers[index]:
            importance = probs.sum(dim=(0, 1)) / (heads * n)
            keep = importance > knobs.thresholds[index] / n
            keep[0] = True
            attended = attended[keep]
        x = layer.output(layer.intermediate(attended), attended)
        kept.append(x.shape[0])
        flops += 2 * (attention_macs(config, n) + feed_forward_macs(config, x.shape[0]))
        if index == layers - 1 or not (knobs.early_exit or return_exit_logits):
            continue
        logits = exit_logits(parts.exits[index], x.mean(dim=0, keepdim=True))[0]
        if every is not None:
            every[index] = logits
        if not knobs.early_exit:
            continue
        flops += 2 * exit_head_macs(config)
        leaves = uncertainty(logits) <= knobs.tau if exit_after is None else exit_after == index + 1
        if leaves:
            return SingleResult(logits, index + 1, kept + [0] * (layers - index - 1), flops, every)
    pooled = bert.pooler.activation(bert.pooler.dense(x[:1]))
    flops += 2 * main_head_macs(config)
    return SingleResult(parts.classifier(pooled)[0], layers, kept, flops, every)


@torch.no_grad()
def reference_forward(
    parts: ModelParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    knobs: ResolvedKnobs,
    return_exit_logits: bool = False,
) -> MagicPyramidOutput:
    """``reference_sequence`` on every row of a padded ``(batch, seq)`` batch (padding on any side), as one
    ``MagicPyramidOutput`` (an ``Engine`` in signature; ``return_exit_logits`` as in ``forward``)."""
    results = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row] != 0
        types = None if token_type_ids is None else token_type_ids[row][real]
        exit_after = knobs.exit_after(row)
        results.append(reference_sequence(parts, input_ids[row][real], types, knobs, exit_after, return_exit_logits))
    device = input_ids.device
    return MagicPyramidOutput(
        logits=torch.stack([r.logits for r in results]),
        exit_layer=torch.tensor([r.exit_layer for r in results], dtype=torch.int64, device=device),
        kept_tokens=torch.tensor([r.kept_tokens for r in results], dtype=torch.int64, device=device),
        flops=torch.tensor([r.flops for r in results], dtype=torch.int64, device=device),
        exit_logits=torch.stack([r.exit_logits for r in results]) if return_exit_logits else None,
    )
