"""FLOPs accounting: 2 x the multiply-accumulates of the matrix products executed for one example.

Per layer, the attention block runs at the sequence's length before pruning ``n_a`` (Q, K, V and output
projections ``4 d^2 n_a``, scores and context ``2 d n_a^2``) and the feed-forward at the length after pruning
``n_f`` (``2 d d_ff n_f``); an example that reaches a sub-classifier pays its MACs, and the main classifier
(pooler and output layer) is paid by examples that reach the last layer. Embeddings, layer norms, softmax and
activations are excluded, as in LTP's and the Magic Pyramid paper's counts. The dense baseline counts every
layer at the unpadded length. The per-block functions accept Python ints or integer tensors (element-wise);
``flops_from_outputs`` is the one place that turns a forward pass's outputs into FLOPs per example, for both
inference paths and for ``mp eval``.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from transformers import BertConfig

Count = TypeVar("Count", int, torch.Tensor)


def attention_macs(config: BertConfig, n: Count) -> Count:
    """MACs of one attention block (projections, scores, context) over ``n`` tokens."""
    d = config.hidden_size
    return 4 * d * d * n + 2 * d * n * n


def feed_forward_macs(config: BertConfig, n: Count) -> Count:
    """MACs of one feed-forward block over ``n`` tokens."""
    return 2 * config.hidden_size * config.intermediate_size * n


def exit_head_macs(config: BertConfig) -> int:
    """MACs of one sub-classifier on one example (``hidden -> exit_hidden_size -> labels``)."""
    width = getattr(config, "exit_hidden_size", 128)
    return config.hidden_size * width + width * config.num_labels


def main_head_macs(config: BertConfig) -> int:
    """MACs of the main classifier on one example (pooler ``d x d`` and output layer ``d x labels``)."""
    d = config.hidden_size
    return d * d + d * config.num_labels


def dense_flops(config: BertConfig, n: Count) -> Count:
    """FLOPs of the dense model (every layer at the unpadded length ``n``, main classifier, no sub-classifiers)."""
    per_layer = attention_macs(config, n) + feed_forward_macs(config, n)
    return 2 * (config.num_hidden_layers * per_layer + main_head_macs(config))


def flops_coefficients(config: BertConfig) -> tuple[int, int, int, int, int]:
    """The integer FLOPs coefficients of ``flops_from_outputs``, for kernels that count FLOPs on the device.

    Returns ``(attention_linear, attention_quadratic, feed_forward, exit_head, main_head)``, each 2 x the MACs of
    the per-block functions above, so that one example's FLOPs are the sum over the layers ``i`` it ran of
    ``attention_linear * n_a + attention_quadratic * n_a**2 + feed_forward * n_f`` (``n_a``: tokens entering layer
    ``i``, ``n_f``: tokens kept after its pruning), plus ``exit_head`` per sub-classifier run and ``main_head``
    when it reached the main classifier.
    """
    one, two = attention_macs(config, 1), attention_macs(config, 2)
    quadratic = (two - 2 * one) // 2
    return (
        2 * (one - quadratic),
        2 * quadratic,
        2 * feed_forward_macs(config, 1),
        2 * exit_head_macs(config),
        2 * main_head_macs(config),
    )


def flops_from_outputs(
    config: BertConfig,
    lengths: torch.Tensor,
    kept_tokens: torch.Tensor,
    exit_layer: torch.Tensor,
    *,
    early_exit: bool,
) -> torch.Tensor:
    """FLOPs per example from what a forward pass reports, on the outputs' device, with no host read.

    Args:
        lengths: ``(batch,)`` integer, each example's unpadded input length.
        kept_tokens: ``(batch, layers)`` integer, tokens kept after each layer's pruning (its feed-forward
            length); the next layer's attention runs at that length.
        exit_layer: ``(batch,)`` integer, layers run (``layers`` for an example that reached the main classifier).
        early_exit: whether sub-classifiers ran (after every layer the example ran, but the last).

    Returns:
        ``(batch,)`` int64 FLOPs: attention and feed-forward of every layer run, ``min(exit_layer, layers - 1)``
        sub-classifiers when ``early_exit``, the main classifier for examples with ``exit_layer == layers``.
    """
    layers = config.num_hidden_layers
    kept = kept_tokens.long()
    before = torch.cat([lengths.long()[:, None], kept[:, :-1]], dim=1)
    ran = torch.arange(1, layers + 1, device=kept.device)[None, :] <= exit_layer[:, None]
    per_layer = attention_macs(config, before) + feed_forward_macs(config, kept)
    macs = (per_layer * ran).sum(dim=1)
    if early_exit:
        macs = macs + exit_head_macs(config) * exit_layer.long().clamp(max=layers - 1)
    macs = macs + main_head_macs(config) * (exit_layer == layers)
    return 2 * macs


def sequence_flops(
    config: BertConfig, length: int, kept_tokens: list[int], exit_layer: int, *, early_exit: bool
) -> int:
    """``flops_from_outputs`` for one example from host integers (the lone-sequence path, with no tensor work).

    ``length``: its unpadded input length; ``kept_tokens``: the tokens kept after each layer (0 after its exit);
    ``exit_layer``: the layers it ran.
    """
    layers = config.num_hidden_layers
    before = [length, *kept_tokens[:-1]]
    macs = sum(
        attention_macs(config, n) + feed_forward_macs(config, kept)
        for n, kept in zip(before[:exit_layer], kept_tokens[:exit_layer], strict=True)
    )
    if early_exit:
        macs += exit_head_macs(config) * min(exit_layer, layers - 1)
    if exit_layer == layers:
        macs += main_head_macs(config)
    return 2 * macs
