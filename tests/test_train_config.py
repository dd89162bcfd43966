"""Specification of ``mp_model.recipe.train_config.TrainConfig``: every field is checked when it is made."""

from __future__ import annotations

import math

import pytest
import torch

from mp_model.recipe import train_config
from mp_model.recipe.train_config import TrainConfig, cpuinfo_has_native_bf16


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs_finetune", -1.0), ("lr", -1e-3), ("lr", 0.0), ("exit_lr", math.inf), ("checkpoint_every", 0)]
    + [("max_drop", math.nan), ("warmup_ratio", 1.5), ("max_length", 1), ("batch_size", 0), ("train_size", 0)]
    + [("temperature", 0.0), ("final_thresholds", (1.0, math.nan)), ("lambdas", ()), ("device", "gpu")]
    + [("weight_decay", -0.1), ("seed", 1.5), ("search_epochs_soft", math.nan), ("epochs_joint", -1.0)]
    + [("exit_scales", ()), ("exit_scales", (None, 0.0)), ("exit_scales", (math.inf,)), ("exit_scales", "1.0")],
)
def test_train_config_refuses_a_bad_field_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "device" else "device 'gpu'"):
        TrainConfig(model="m", **{field: value})


@pytest.mark.parametrize(
    ("precision", "device", "native_cpu", "dtype"),
    [("auto", "cpu", False, None), ("auto", "cpu", True, torch.bfloat16), ("auto", "cuda", False, torch.bfloat16)]
    + [("fp32", "cpu", True, None), ("fp32", "cuda", False, None), ("bf16", "cpu", False, torch.bfloat16)],
)
def test_precision_names_the_autocast_dtype(
    monkeypatch: pytest.MonkeyPatch, precision: str, device: str, native_cpu: bool, dtype: torch.dtype | None
) -> None:
    """``auto`` is bf16 on CUDA and on a CPU that multiplies bf16 natively, fp32 on other CPUs."""
    monkeypatch.setattr(train_config, "cpu_has_native_bf16", lambda: native_cpu)
    config = TrainConfig(model="m", precision=precision)
    config.device = device  # after the checks, which refuse cuda on a machine without it
    assert config.autocast_dtype == dtype
    assert config.arithmetic == ("fp32" if dtype is None else "bf16")


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n", True),
        ("flags\t\t: fpu sse avx2 avx512f avx512bw\n", False),
        ("model name\t: a CPU named avx512_bf16\nflags\t\t: fpu sse\n", False),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo: str, native: bool) -> None:
    assert cpuinfo_has_native_bf16(cpuinfo) is native


def test_precision_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_distillation_refuses_an_unknown_direction() -> None:
    with pytest.raises(ValueError, match="distillation must be one of"):
        TrainConfig(distillation="both")


@pytest.mark.parametrize("name", ["exit_label_weight", "prune_teacher_weight"])
@pytest.mark.parametrize("weight", [-0.5, 1.01, float("nan")])
def test_loss_mixing_weights_must_lie_in_zero_one(name: str, weight: float) -> None:
    with pytest.raises(ValueError, match=name):
        TrainConfig(**{name: weight})


def test_exit_scales_keep_none_for_unpruned_and_become_a_tuple_of_floats() -> None:
    assert TrainConfig(model="m").exit_scales == (None, 1.0, 2.0)
    assert TrainConfig(model="m", exit_scales=[1, None]).exit_scales == (1.0, None)
    saved = TrainConfig(model="m", exit_scales=(None, 1.5)).to_dict()
    assert TrainConfig.from_dict(saved).exit_scales == (None, 1.5)


def test_dev_from_train_with_a_dev_size_is_refused_rather_than_dropped() -> None:
    with pytest.raises(ValueError, match="dev_from_train 200 with dev_size 16: .* would be dropped"):
        TrainConfig(dev_from_train=200, dev_size=16)
    assert TrainConfig(dev_from_train=200).dev_size is None
