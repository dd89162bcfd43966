"""Specification of ``mp_model.recipe.fit``'s pieces that need no training run (the recipe runs in
``test_training.py``)."""

from __future__ import annotations

import pytest
import torch

from mp_model.recipe.fit import UNLABELLED, distillation_loss, exit_loss


def test_distillation_loss_is_zero_when_exits_agree_and_positive_otherwise() -> None:
    main = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    assert float(distillation_loss(main.expand(2, 2, 2), main)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(-main.expand(2, 2, 2), main)) > 0.1


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distillation_loss_is_the_kl_divergence_of_its_direction(direction: str) -> None:
    generator = torch.Generator().manual_seed(0)
    exits, main = torch.randn(3, 4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    student, teacher = exits.softmax(dim=-1).double(), main.softmax(dim=-1).double()
    first, second = (teacher.expand_as(student), student) if direction == "forward" else (student, teacher)
    expected = (first * (first / second).log()).sum(dim=-1).sum(dim=0).mean()
    assert float(distillation_loss(exits, main, direction)) == pytest.approx(float(expected), rel=1e-5)


def test_distillation_loss_refuses_an_unknown_direction() -> None:
    with pytest.raises(ValueError, match="direction"):
        distillation_loss(torch.zeros(1, 2, 2), torch.zeros(2, 2), "sideways")


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
