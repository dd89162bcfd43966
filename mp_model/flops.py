"""FLOPs accounting: 2 x the multiply-accumulates of the matrix products executed for one example.

Per layer, the attention block runs at the sequence's length before pruning ``n_a`` (Q, K, V and output
projections ``4 d^2 n_a``, scores and context ``2 d n_a^2``) and the feed-forward at the length after pruning
``n_f`` (``2 d d_ff n_f``); an example that reaches a sub-classifier pays its MACs, and the main classifier
(pooler and output layer) is paid by examples that reach the last layer. Embeddings, layer norms, softmax and
activations are excluded, as in LTP's and the Magic Pyramid paper's counts. The dense baseline counts every
layer at the unpadded length. All functions accept Python ints or integer tensors (element-wise).
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
