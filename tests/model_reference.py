"""A plain eager oracle for the model tests: one example at a time, tokens and layers removed explicitly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mp_model import MagicPyramidForSequenceClassification
from mp_model.flops import attention_macs, exit_head_macs, feed_forward_macs, main_head_macs


@dataclass
class SingleResult:
    logits: torch.Tensor
    exit_layer: int
    kept_tokens: list[int]
    flops: int


@torch.no_grad()
def run_single(
    model: MagicPyramidForSequenceClassification,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    *,
    tau: float,
    threshold_scale: float,
    prune: bool,
    early_exit: bool,
) -> SingleResult:
    """Run one unpadded example ``(n,)`` through ``model`` with explicit per-layer removal."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    layers = config.num_hidden_layers
    x = model.bert.embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None])[0]
    kept: list[int] = []
    flops = 0
    for index, layer in enumerate(model.bert.encoder.layer):
        attention = layer.attention.self
        n = x.shape[0]
        q, k, v = (
            p(x).view(n, heads, head_dim).transpose(0, 1) for p in (attention.query, attention.key, attention.value)
        )
        probs = (q @ k.transpose(-1, -2) * attention.scaling).softmax(dim=-1)
        attended = layer.attention.output((probs @ v).transpose(0, 1).reshape(n, -1), x)
        threshold = float(model.thresholds[index]) * threshold_scale
        if prune and threshold > 0:
            importance = probs.sum(dim=(0, 1)) / (heads * n)
            keep = importance > threshold / n
            keep[0] = True
            attended = attended[keep]
        x = layer.output(layer.intermediate(attended), attended)
        kept.append(x.shape[0])
        flops += 2 * (attention_macs(config, n) + feed_forward_macs(config, x.shape[0]))
        if early_exit and index < layers - 1:
            flops += 2 * exit_head_macs(config)
            logits = model.exits[index](x.mean(dim=0, keepdim=True))[0]
            p = logits.double().softmax(dim=-1)
            uncertainty = float((p * p.clamp_min(1e-300).log()).sum() / math.log(1.0 / p.numel()))
            if uncertainty <= tau:
                return SingleResult(logits, index + 1, kept + [0] * (layers - index - 1), flops)
    pooled = model.bert.pooler.activation(model.bert.pooler.dense(x[:1]))
    flops += 2 * main_head_macs(config)
    return SingleResult(model.classifier(pooled)[0], layers, kept, flops)
