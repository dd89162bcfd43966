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
