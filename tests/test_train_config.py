"""Specification of ``mp_model.recipe.train_config.TrainConfig``: every field is checked when it is made."""

from __future__ import annotations

import math

import pytest
import torch

from mp_model.recipe.train_config import TrainConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs_finetune", -1.0), ("lr", -1e-3), ("lr", 0.0), ("exit_lr", math.inf), ("checkpoint_every", 0)]
    + [("max_drop", math.nan), ("warmup_ratio", 1.5), ("max_length", 1), ("batch_size", 0), ("train_size", 0)]
    + [("temperature", 0.0), ("final_thresholds", (1.0, math.nan)), ("lambdas", ()), ("device", "gpu")]
    + [("weight_decay", -0.1), ("seed", 1.5), ("search_epochs_soft", math.nan)],
)
def test_train_config_refuses_a_bad_field_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "device" else "device 'gpu'"):
        TrainConfig(model="m", **{field: value})


@pytest.mark.parametrize(
    ("precision", "device", "dtype"),
    [("auto", "cpu", None), ("fp32", "cpu", None), ("bf16", "cpu", torch.bfloat16)],
)
def test_precision_names_the_autocast_dtype(precision: str, device: str, dtype: torch.dtype | None) -> None:
    assert TrainConfig(precision=precision, device=device).autocast_dtype == dtype


def test_precision_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_distillation_refuses_an_unknown_direction() -> None:
    with pytest.raises(ValueError, match="distillation must be one of"):
        TrainConfig(distillation="both")
