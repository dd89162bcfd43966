"""Specification of ``mp_model.recipe.fit_exits``' loss, which needs no training run (stage 4 itself runs in
``test_training.py``): self-distillation mixed with the gold labels, and distillation alone where there are none."""

from __future__ import annotations

import pytest
import torch

from mp_model.recipe.fit import distillation_loss
from mp_model.recipe.fit_exits import UNLABELLED, exit_loss


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
