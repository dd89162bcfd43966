"""Specification of ``mp_model.recipe.evaluation``'s checks (selection: ``test_selection.py``; the simulated exits
are checked against the packed path on a trained run in ``test_training.py``, the whole ``mp eval`` in
``test_cli.py``)."""

from __future__ import annotations

import pytest

from mp_model.recipe.evaluation import evaluate


def test_evaluation_refuses_labels_outside_the_model() -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = MagicPyramidForSequenceClassification(config)
    encoded = {"input_ids": [[1, 5, 2]], "attention_mask": [[1] * 3], "token_type_ids": [[0] * 3], "labels": [4]}
    with pytest.raises(ValueError, match="label 4 is outside the model's 2 labels"):
        evaluate(model, model, encoded, dataset="d", split="test", methods=["dense"])
