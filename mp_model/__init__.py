"""The Magic Pyramid model: BERT with learned token pruning and batched early exit, its FLOPs and training.

Importing ``mp_model`` registers ``MagicPyramidConfig`` (model type ``magic_pyramid``) and
``MagicPyramidForSequenceClassification`` with transformers' ``AutoConfig`` and
``AutoModelForSequenceClassification`` (the documented ``register`` route, idempotent), so a saved model opens as
any HF model does::

    import mp_model
    from transformers import pipeline

    run = "runs/rotten_tomatoes/stage4_exits"
    classify = pipeline("text-classification", model=run, model_kwargs={"exit_tau": 0.3})
    classify(["a moving, brilliant film"])  # [{'label': ..., 'score': ...}]

The pipeline calls the model with the tokenizer's outputs only, so its serve-time knobs are the config's defaults:
``exit_tau`` (the exit threshold ``tau``), ``threshold_scale``, ``use_pruning`` and ``use_early_exit``. Set them
when loading (``model_kwargs`` of ``pipeline``, or keyword arguments of ``from_pretrained``: transformers copies keyword
arguments that name config fields into the config) or afterwards on ``pipe.model.config``; a value out of range is
a ``ValueError`` at the first call. ``mp_model.export.to_bert`` writes the dense weights as a plain
``BertForSequenceClassification`` checkpoint that loads without this package.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from mp_model.config import MagicPyramidConfig
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.outputs import MagicPyramidOutput, MagicPyramidTrainingOutput

AutoConfig.register(MagicPyramidConfig.model_type, MagicPyramidConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MagicPyramidConfig, MagicPyramidForSequenceClassification, exist_ok=True)

__all__ = [
    "MagicPyramidConfig",
    "MagicPyramidForSequenceClassification",
    "MagicPyramidOutput",
    "MagicPyramidTrainingOutput",
]
