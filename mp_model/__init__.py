"""The Magic Pyramid model: BERT with learned token pruning and batched early exit, its FLOPs and training."""

from mp_model.config import MagicPyramidConfig
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.outputs import MagicPyramidOutput, MagicPyramidTrainingOutput

__all__ = [
    "MagicPyramidConfig",
    "MagicPyramidForSequenceClassification",
    "MagicPyramidOutput",
    "MagicPyramidTrainingOutput",
]
