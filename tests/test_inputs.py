"""Specification of the model's input handling: padding on either side, value checks in one host read, and the
NaN policy of the learned thresholds and knobs.

``forward`` and ``masked_forward`` move each row's real tokens to the left before anything else, so left-, right-
and mixed-padded batches of the same texts give identical outputs on every engine. With ``validate`` the values of
the inputs are checked in one combined host read: a clear ``ValueError`` names the argument and the bad range.
NaN or infinite learned thresholds are rejected where they enter the model and at forward time.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification
from mp_model.modeling import _check_inputs
from tests.test_graph_engine import host_reads
from tests.test_model import LENGTHS, TINY, random_batch, tiny_model
from tests.utils import DEVICE

THRESHOLDS = [0.97, 1.01, 1.03, 1.05]
OUTPUTS = ("logits", "exit_layer", "kept_tokens", "flops")
NAN, INF = float("nan"), float("inf")


def repad(batch: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """The same texts as the right-padded ``batch``, padded on the left, or split between both sides."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    padding = width - mask.sum(dim=1)
    shift = padding if side == "left" else padding // 2
    index = torch.remainder(torch.arange(width)[None, :] - shift[:, None], width)
    return {name: tensor.gather(1, index) for name, tensor in batch.items()}


@pytest.fixture(scope="module")
def model() -> MagicPyramidForSequenceClassification:
    return tiny_model(THRESHOLDS)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return random_batch(LENGTHS, TINY["vocab_size"])


def assert_same_outputs(a, b) -> None:
    for name in OUTPUTS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------------------------------- padding side
def test_the_padding_test_sees_left_and_mixed_padding(batch) -> None:
    left, mixed = repad(batch, "left"), repad(batch, "both")
    assert (left["attention_mask"][:, -1] == 1).all() and (left["attention_mask"][:, 0] == 0).any()
    assert (mixed["attention_mask"][:, 0] == 0).any() and (mixed["attention_mask"][:, -1] == 0).any()


@pytest.mark.parametrize("side", ["left", "both"])
@pytest.mark.parametrize("engine", ["packed", "graph"])
def test_padding_side_never_changes_a_result(model, batch, engine: str, side: str) -> None:
    knobs = dict(tau=0.2, threshold_scale=1.0, engine=engine, backend="torch")
    expected = model(**batch, **knobs)
    assert (expected.exit_layer < TINY["num_hidden_layers"]).any() and (expected.kept_tokens[:, 0] < 64).any()
    assert_same_outputs(model(**repad(batch, side), **knobs), expected)


def test_padding_side_never_changes_a_result_on_the_triton_graph_engine(batch) -> None:
    model = tiny_model(THRESHOLDS).float().to(DEVICE)
    knobs = dict(tau=0.2, engine="graph", backend="triton")
    right = {name: tensor.to(DEVICE) for name, tensor in batch.items()}
    left = {name: tensor.to(DEVICE) for name, tensor in repad(batch, "left").items()}
    assert_same_outputs(model(**left, **knobs), model(**right, **knobs))


@pytest.mark.parametrize("mask_mode", ["hard", "soft"])
def test_padding_side_never_changes_the_training_path(model, batch, mask_mode: str) -> None:
    """Same logits and exit logits; the masks come back in each input's own columns."""
    left = repad(batch, "left")
    with torch.no_grad():
        right_out = model.masked_forward(**batch, mask_mode=mask_mode)
        left_out = model.masked_forward(**left, mask_mode=mask_mode)
    assert torch.equal(left_out.logits, right_out.logits)
    assert torch.equal(left_out.exit_logits, right_out.exit_logits)
    assert torch.equal(left_out.mask_mean, right_out.mask_mean)
    for layer, mask in enumerate(right_out.masks):
        assert torch.equal(left_out.masks[layer], repad({"masks": mask, **batch}, "left")["masks"]), layer
    assert (left_out.masks[:, left["attention_mask"] == 0] == 0).all()


def test_padding_between_real_tokens_is_rejected(model, batch) -> None:
    holed = {**batch, "attention_mask": batch["attention_mask"].clone()}
    holed["attention_mask"][6, 3] = 0
    with pytest.raises(ValueError, match=r"rows \[6\] have padding between real tokens"):
        model(**holed, backend="torch")
    with pytest.raises(ValueError, match="padding between real tokens"):
        model.masked_forward(**holed)


# ----------------------------------------------------------------------------------------------- id ranges
@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("input_ids", -1, r"input_ids must lie in \[0, vocab_size=100\), got values in \[-1, "),
        ("input_ids", 100, r"input_ids must lie in \[0, vocab_size=100\), got values in \[0, 100\]"),
        ("token_type_ids", 2, r"token_type_ids must lie in \[0, type_vocab_size=2\), got values in \[0, 2\]"),
        ("token_type_ids", -3, r"token_type_ids must lie in \[0, type_vocab_size=2\), got values in \[-3, "),
    ],
)
def test_ids_out_of_range_are_a_value_error_naming_them(model, batch, name: str, value: int, match: str) -> None:
    bad = {**batch, name: batch[name].clone()}
    bad[name][2, 1] = value
    with pytest.raises(ValueError, match=match):
        model(**bad, backend="torch")
    with pytest.raises(ValueError, match=match):
        model.masked_forward(**bad)


def test_float_token_type_ids_are_rejected(model, batch) -> None:
    with pytest.raises(ValueError, match="token_type_ids must be an integer tensor"):
        model(**{**batch, "token_type_ids": batch["token_type_ids"].float()}, backend="torch")


@pytest.mark.parametrize("validate", [True, False])
def test_value_checks_take_one_host_read_and_validate_false_skips_it(model, batch, validate: bool) -> None:
    schedule = torch.zeros(len(LENGTHS), dtype=torch.int64)
    with host_reads() as calls:
        mask, longest, _ = _check_inputs(model.config, *batch.values(), validate, schedule)
    # On a GPU the values come back in one read; on the CPU through numpy views of the four tensors (no sync).
    reads = ["Tensor.tolist from mp_model.modeling"] if batch["input_ids"].is_cuda else ["Tensor.numpy"] * 4
    assert [call.removesuffix(" from mp_model.modeling") for call in calls] == (
        [read.removesuffix(" from mp_model.modeling") for read in reads] if validate else []
    )
    assert longest == (max(LENGTHS) if validate else batch["input_ids"].shape[1])


# ----------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (torch.tensor([1, 2, 3, 4, -1, 1, 2, 3, 4, 1]), "exit_schedule must be non-negative, got -1"),
        (torch.ones(10), "exit_schedule must be an integer"),
        (torch.ones(10, dtype=torch.int64, device="meta"), "exit_schedule is on meta"),
        (torch.ones(9, dtype=torch.int64), r"exit_schedule must be a \(10,\) tensor"),
        ([1] * 10, r"exit_schedule must be a \(10,\) tensor"),
    ],
)
def test_bad_exit_schedules_are_rejected(model, batch, schedule, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(**batch, exit_schedule=schedule, backend="torch")


def test_an_int32_exit_schedule_equals_the_int64_one(model, batch) -> None:
    schedule = torch.tensor([1, 2, 3, 4, 9, 1, 0, 3, 4, 1])
    for engine in ("packed", "graph"):
        expected = model(**batch, exit_schedule=schedule, engine=engine, backend="torch")
        assert_same_outputs(model(**batch, exit_schedule=schedule.int(), engine=engine, backend="torch"), expected)
        assert expected.exit_layer[6] == TINY["num_hidden_layers"]


# -------------------------------------------------------------------------------------------------- knobs
@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (dict(tau=NAN), "tau"),
        (dict(threshold_scale=NAN), "threshold_scale"),
        (dict(threshold_scale=INF), "threshold_scale"),
        (dict(threshold_scale=-INF), "threshold_scale"),
    ],
)
def test_nan_and_infinite_knobs_are_rejected(model, batch, knobs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(**batch, **knobs, backend="torch")
    if "threshold_scale" in knobs:
        with pytest.raises(ValueError, match=match):
            model.masked_forward(**batch, **knobs)


# ------------------------------------------------------------------------------------- learned thresholds
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_the_config_rejects_non_finite_thresholds(bad: float) -> None:
    with pytest.raises(ValueError, match=r"prune_thresholds must be finite.*layers \[2\]"):
        MagicPyramidConfig(prune_thresholds=[0.5, 1.0, bad, 1.0], **TINY)


def test_set_thresholds_rejects_nan_and_changes_nothing(model) -> None:
    before, recorded = model.thresholds.detach().clone(), list(model.config.prune_thresholds)
    with pytest.raises(ValueError, match="thresholds must be finite"):
        model.set_thresholds([0.5, NAN, 1.0, 1.0])
    assert torch.equal(model.thresholds.detach(), before) and model.config.prune_thresholds == recorded


def test_loading_a_config_with_nan_thresholds_is_rejected(tmp_path) -> None:
    tiny_model(THRESHOLDS).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["prune_thresholds"][1] = math.nan
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="prune_thresholds must be finite"):
        MagicPyramidForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("engine", ["packed", "graph"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_forward_rejects_non_finite_learned_thresholds(batch, engine: str, bad: float) -> None:
    """A NaN threshold used to stop pruning silently: now an error while pruning, nothing while not pruning."""
    model = copy.deepcopy(tiny_model(THRESHOLDS))
    expected = model(**batch, prune=False, engine=engine, backend="torch")
    with torch.no_grad():
        model.thresholds[1] = bad
    with pytest.raises(ValueError, match=r"thresholds must be finite.*layers \[1\]"):
        model(**batch, engine=engine, backend="torch")
    assert_same_outputs(model(**batch, prune=False, engine=engine, backend="torch"), expected)
    if engine == "packed":
        with pytest.raises(ValueError, match="thresholds must be finite"):
            model.masked_forward(**batch, mask_mode="hard")
    with torch.no_grad():
        model.thresholds[1] = 1.0
    model(**batch, engine=engine, backend="torch")
