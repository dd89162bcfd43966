"""Output types of the Magic Pyramid model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class MagicPyramidOutput(ModelOutput):
    """Result of the packed inference path, one row per input example, in input order.

    Attributes:
        logits: ``(batch, labels)``, from the sub-classifier the example exited at, or the main classifier.
        exit_layer: ``(batch,)`` int64, the number of layers the example ran (``num_hidden_layers`` when it
            reached the main classifier).
        kept_tokens: ``(batch, layers)`` int64, the tokens the example kept after each layer's pruning (its
            feed-forward length); 0 for the layers after its exit.
        flops: ``(batch,)`` int64, FLOPs executed for the example (see ``mp_model.flops``).
        exit_logits: ``(batch, layers - 1, labels)``, every sub-classifier's logits on the example, only when
            asked for (``return_exit_logits=True``, for evaluation); NaN after the example's exit. Not counted
            in ``flops`` unless early exit ran those heads anyway.
    """

    logits: torch.Tensor | None = None
    exit_layer: torch.Tensor | None = None
    kept_tokens: torch.Tensor | None = None
    flops: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None


@dataclass
class MagicPyramidTrainingOutput(ModelOutput):
    """Result of the masked (padded, differentiable) training path.

    Attributes:
        logits: ``(batch, labels)`` from the main classifier.
        exit_logits: ``(layers - 1, batch, labels)``: each sub-classifier's logits.
        masks: ``(layers, batch, seq)`` float: the mask applied to each layer's output (1 where no mask is
            applied, 0 at padding).
        mask_mean: scalar, the mean mask over real tokens and pruning layers (the L1 term of soft pruning).
        kept_ratio: ``(layers,)`` share of real tokens that hard masks would keep after each layer.
        exit_features: ``(layers - 1, batch, hidden)``: what each sub-classifier reads, the mean of the
            sequence's live tokens after the layer.
    """

    logits: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    mask_mean: torch.Tensor | None = None
    kept_ratio: torch.Tensor | None = None
    exit_features: torch.Tensor | None = None
