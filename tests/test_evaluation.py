"""Specification of ``mp_model.recipe.evaluation``'s checks and selection (the simulated exits are checked against
the packed path on a trained run in ``test_training.py``, the whole ``mp eval`` in ``test_cli.py``)."""

from __future__ import annotations

import math

import pytest

from mp_model.recipe.evaluation import evaluate, select


def test_evaluation_refuses_labels_outside_the_model() -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = MagicPyramidForSequenceClassification(config)
    encoded = {"input_ids": [[1, 5, 2]], "attention_mask": [[1] * 3], "token_type_ids": [[0] * 3], "labels": [4]}
    with pytest.raises(ValueError, match="label 4 is outside the model's 2 labels"):
        evaluate(model, model, encoded, dataset="d", split="test", methods=["dense"])


def test_select_picks_fewest_gflops_within_the_drop() -> None:
    def record(method: str, accuracy: float, gflops: float) -> dict:
        return {"dataset": "d", "method": method, "accuracy": accuracy, "gflops": gflops}

    records = [
        record("dense", 0.90, 4.0),
        record("ltp", 0.895, 2.0),
        record("ltp", 0.88, 1.0),
        record("mp", 0.70, 0.5),
        record("mp", 0.80, 0.6),
    ]
    chosen = {r["method"]: r for r in select(records, max_drop=0.01)}
    assert chosen["dense"]["gflops"] == 4.0
    assert chosen["ltp"]["gflops"] == 2.0
    assert chosen["mp"]["accuracy"] == 0.80
    assert "fastbert" not in chosen


def test_select_refuses_a_nan_max_drop() -> None:
    with pytest.raises(ValueError, match="max_drop"):
        select([{"dataset": "d", "method": "dense", "accuracy": 0.5, "gflops": 1.0}], math.nan)
