"""Specification of ``mp_model.recipe.fit``'s pieces that need no training run (the recipe runs in
``test_training.py``)."""

from __future__ import annotations

import pytest
import torch

from mp_model.recipe.fit import distillation_loss


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
