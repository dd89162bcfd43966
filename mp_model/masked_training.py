"""The masked training path: padded, differentiable, sharing the modules of the packed inference path.

Each layer computes attention explicitly, so that token importance (the attention a token receives, averaged
over heads and live query rows, times the live length: mean 1 over a sequence) is differentiable. Masks on
each layer's output implement Learned Token Pruning's training stages:

- ``"none"``: plain fine-tuning (stage 1) and sub-classifier distillation without pruning.
- ``"soft"``: ``sigmoid((s - threshold) / T)`` multiplies the layer output (stage 2); gradients reach both
  the weights and the thresholds; the caller adds ``lambda * mask_mean`` to the loss.
- ``"hard"``: binary masks ``s > threshold`` (stages 3 and 4); a pruned token also stops being a key and a
  query for every later layer, exactly as if it were removed, so the result matches the packed path.

The first token of every sequence is never masked (it feeds the main classifier), so no sequence empties.
"""

from __future__ import annotations

import torch
from torch import nn

from mp_model.engine import ModelParts
from mp_model.exit_head import apply_exits
from mp_model.outputs import MagicPyramidTrainingOutput

MASK_MODES = ("none", "soft", "hard")


class TrainingParts(ModelParts):
    """What the training path reads of a model besides the engines' ``ModelParts``: the learnable thresholds
    ``(layers,)`` and the dropout before the main classifier."""

    thresholds: nn.Parameter
    dropout: nn.Dropout


def masked_forward(
    model: TrainingParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    *,
    mask_mode: str,
    temperature: float,
    threshold_scale: float = 1.0,
) -> MagicPyramidTrainingOutput:
    """Padded forward pass of ``(batch, seq)`` inputs with masks of ``mask_mode``; see the module docstring."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    config = model.config
    bert = model.bert
    batch, width = input_ids.shape
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    real = attention_mask.bool()
    live = real.clone()
    first = torch.zeros_like(real)
    first[:, 0] = True

    hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    masks, exit_features, kept = [], [], []
    mask_terms = []
    for index, layer in enumerate(bert.encoder.layer):
        self_attention = layer.attention.self
        q, k, v = (
            projection(hidden).view(batch, width, heads, head_dim).transpose(1, 2)
            for projection in (self_attention.query, self_attention.key, self_attention.value)
        )
        scores = torch.matmul(q, k.transpose(-1, -2)) * self_attention.scaling
        scores = scores.masked_fill(~live[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        context = torch.matmul(self_attention.dropout(probs), v).transpose(1, 2).reshape(batch, width, -1)
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)

        threshold = model.thresholds[index] * threshold_scale
        prunes = mask_mode != "none" and bool(threshold.detach() > 0)
        if prunes:
            importance = (probs * live[:, None, :, None]).sum(dim=(1, 2)) / heads
            keep = (importance > threshold) | first
            if mask_mode == "soft":
                mask = torch.where(first, 1.0, torch.sigmoid((importance - threshold) / temperature)) * live
                mask_terms.append(mask.sum() / live.sum())
            else:
                mask = (keep & live).to(hidden.dtype)
                live = live & keep
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
            kept.append(((keep & real).sum() / real.sum()).detach())
        else:
            mask = live.to(hidden.dtype)
            kept.append((live.sum() / real.sum()).detach())
        masks.append(mask)
        if index < config.num_hidden_layers - 1:
            weights = live.to(hidden.dtype).unsqueeze(-1)
            exit_features.append((hidden * weights).sum(dim=1) / weights.sum(dim=1))

    pooled = bert.pooler.activation(bert.pooler.dense(hidden[:, 0]))
    logits = model.classifier(model.dropout(pooled))
    mask_mean = torch.stack(mask_terms).mean() if mask_terms else hidden.new_zeros(())
    features = torch.stack(exit_features) if exit_features else hidden.new_zeros(0, batch, config.hidden_size)
    return MagicPyramidTrainingOutput(
        logits=logits,
        exit_logits=apply_exits(model.exits, features, config.num_labels),
        exit_features=features,
        masks=torch.stack(masks),
        mask_mean=mask_mean,
        kept_ratio=torch.stack(kept),
    )
