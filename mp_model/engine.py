"""The contract between the model and its engines: what an engine reads of a model, and how it is called.

An engine runs the Magic Pyramid forward of ``mp_model.reference`` faster. Three implement ``Engine``:

* ``mp_model.packed_inference.PackedEngine``: host-sized packed batches, PyTorch operators and ``mp_kernels``;
* the same class with ``use_ort=True``: a lone sequence's layers run by ONNX Runtime (``mp_model.ort_layers``);
* ``mp_model.graph_engine.GraphEngine``: fixed-capacity buckets, no host synchronisation, CUDA graphs.

An engine takes the model's modules through ``ModelParts`` (a structural type the model satisfies, so no engine
imports the model class) and the call's knobs as one ``ResolvedKnobs`` (``mp_model.knobs``), and returns a
``MagicPyramidOutput`` with one row per input example.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers import BertModel

from mp_model.config import MagicPyramidConfig
from mp_model.knobs import ResolvedKnobs
from mp_model.outputs import MagicPyramidOutput


class ModelParts(Protocol):
    """What an engine reads of a model: the config, the BERT backbone (embeddings, encoder layers, pooler), the
    sub-classifiers after each layer but the last (``ExitClassifier``) and the main classifier's output layer."""

    config: MagicPyramidConfig
    bert: BertModel
    exits: nn.ModuleList
    classifier: nn.Linear


class Engine(Protocol):
    """One Magic Pyramid forward over a padded batch."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        knobs: ResolvedKnobs,
    ) -> MagicPyramidOutput:
        """Run validated ``(batch, seq)`` inputs (``MagicPyramidForSequenceClassification.forward`` checks them)
        whose rows hold their real tokens first (the graph engine also takes any padding side) with ``knobs``."""
        ...
