"""Specification of ``mp_model.recipe.fit_exits`` on a tiny random model, without a training run (stage 4 itself
runs in ``test_training.py``): the loss (self-distillation mixed with the gold labels, distillation alone where
there are none) and the cache at several threshold scales, trained in the steps of one."""

from __future__ import annotations

import pytest
import torch

from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification
from mp_model.recipe.data import Encoded
from mp_model.recipe.fit import distillation_loss
from mp_model.recipe.fit_exits import (
    UNLABELLED,
    ExitTargets,
    concatenated,
    distillation_cache,
    exit_loss,
    exit_targets,
    fit_exits,
)
from mp_model.recipe.train_config import TrainConfig

HIDDEN, LAYERS = 32, 3


def tiny_model() -> MagicPyramidForSequenceClassification:
    torch.manual_seed(0)
    config = MagicPyramidConfig(
        vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64
    )
    model = MagicPyramidForSequenceClassification(config).eval()
    model.set_thresholds([0.6, 0.9, 1.2])
    return model


def random_encoded(lengths: list[int]) -> Encoded:
    generator = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, 60, (n,), generator=generator).tolist() for n in lengths]
    return {
        "input_ids": ids,
        "attention_mask": [[1] * n for n in lengths],
        "token_type_ids": [[0] * n for n in lengths],
        "labels": [i % 2 for i in range(len(lengths))],
    }


def config(**changes: object) -> TrainConfig:
    return TrainConfig(model="m", batch_size=4, eval_batch_size=4, epochs_exits=2.0, precision="fp32", **changes)


@pytest.mark.parametrize("label_weight", [0.0, 0.3, 1.0])
def test_exit_loss_mixes_distillation_and_gold_label_cross_entropy(label_weight: float) -> None:
    generator = torch.Generator().manual_seed(1)
    exits, main = torch.randn(3, 4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    labels = torch.tensor([0, 4, 2, 2])
    cross_entropy = sum(torch.nn.functional.cross_entropy(exits[layer].double(), labels) for layer in range(3))
    expected = (1 - label_weight) * float(distillation_loss(exits, main)) + label_weight * float(cross_entropy)
    assert float(exit_loss(exits, main, labels, "forward", label_weight)) == pytest.approx(expected, rel=1e-5)


def test_exit_loss_with_label_weight_one_ignores_the_main_classifier() -> None:
    exits, labels = torch.randn(2, 3, 4), torch.tensor([1, 0, 3])
    first = exit_loss(exits, torch.randn(3, 4), labels, label_weight=1.0)
    assert float(first) == pytest.approx(float(exit_loss(exits, torch.randn(3, 4), labels, label_weight=1.0)))


@pytest.mark.parametrize("label_weight", [-0.1, 1.5, float("nan")])
def test_exit_loss_refuses_a_label_weight_outside_zero_one(label_weight: float) -> None:
    with pytest.raises(ValueError, match="label_weight"):
        exit_loss(torch.zeros(1, 2, 2), torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64), label_weight=label_weight)


def test_exit_loss_distils_alone_on_unlabelled_examples() -> None:
    generator = torch.Generator().manual_seed(2)
    exits, main = torch.randn(2, 3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    labels = torch.tensor([1, UNLABELLED, 3])
    kl = distillation_loss(exits, main, reduce=False)
    cross_entropy = -exits.log_softmax(dim=-1)[:, [0, 2], [1, 3]].sum(dim=0)
    expected = (0.4 * kl[[0, 2]] + 0.6 * cross_entropy).sum() + kl[1]
    assert float(exit_loss(exits, main, labels, label_weight=0.6)) == pytest.approx(float(expected) / 3, rel=1e-5)
    nothing = torch.full((3,), UNLABELLED)
    assert float(exit_loss(exits, main, nothing, label_weight=1.0)) == pytest.approx(float(kl.mean()), rel=1e-6)


def test_the_cache_holds_one_pass_per_threshold_scale_each_with_its_own_teacher() -> None:
    model, encoded = tiny_model(), random_encoded([1, 7, 13, 5, 2, 11])
    cache = distillation_cache(model, encoded, config(exit_scales=(None, 1.0, 3.0)), labelled=4, progress=False)
    assert cache.passes == 3 and cache.features.shape == (18, LAYERS - 1, HIDDEN)
    for index, scale in enumerate((None, 1.0, 3.0)):
        alone = exit_targets(model, encoded, config(), labelled=4, threshold_scale=scale, progress=False)
        rows = slice(6 * index, 6 * index + 6)
        assert torch.equal(cache.features[rows], alone.features) and torch.equal(cache.teacher[rows], alone.teacher)
        assert cache.labels[rows].tolist() == [0, 1, 0, 1, UNLABELLED, UNLABELLED]
    pruned = exit_targets(model, encoded, config(), threshold_scale=3.0, progress=False)
    assert pruned.kept_ratio < 1.0 and not torch.equal(pruned.features, cache.features[:6])  # the scales differ


def test_more_passes_train_in_the_steps_of_one() -> None:
    generator = torch.Generator().manual_seed(3)

    def targets(rows: int, passes: int) -> ExitTargets:
        features = torch.randn(rows, LAYERS - 1, HIDDEN, generator=generator)
        labels = torch.arange(rows) % 2
        return ExitTargets(features, torch.randn(rows, 2, generator=generator), labels, 1.0, passes)

    one = fit_exits(tiny_model(), targets(12, 1), config(), seed=0, progress=False)
    three = fit_exits(tiny_model(), concatenated([targets(12, 1)] * 3), config(), seed=0, progress=False)
    assert one["steps"] == three["steps"] == 6  # 2 epochs of 12 examples in batches of 4
    assert (one["distillation_examples"], three["distillation_examples"], three["distillation_rows"]) == (12, 12, 36)
    assert one["labelled_examples"] == three["labelled_examples"] == 12
