"""Specification of ``mp_model.recipe.fit``'s pieces that need no training run (the recipe runs in
``test_training.py``): the distillation loss, and stage 4's joint objective (trainable weights, learning rates,
loss)."""

from __future__ import annotations

import pytest
import torch

from mp_model import MagicPyramidForSequenceClassification
from mp_model.recipe.fit import StageSpec, distillation_loss, optimizer_groups, set_trainable, stage_loss
from mp_model.recipe.train_config import TrainConfig
from tests.utils import write_tiny_model


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> MagicPyramidForSequenceClassification:
    folder = write_tiny_model(tmp_path_factory.mktemp("fit") / "model")
    model = MagicPyramidForSequenceClassification.from_pretrained(str(folder))
    model.set_thresholds([0.3] * model.config.num_hidden_layers)
    return model


def toy_batch(model: MagicPyramidForSequenceClassification, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Random token ids of uneven ``lengths`` (padded), their labels and index."""
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(1000, model.config.vocab_size, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    labels = torch.randint(0, 2, (len(lengths),), generator=generator)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


def test_joint_trains_every_weight_but_the_thresholds_and_the_heads_at_their_own_rate(
    tiny: MagicPyramidForSequenceClassification,
) -> None:
    config = TrainConfig(model="unused", lr=2e-5, exit_lr=1e-3, weight_decay=0.01)
    named = set_trainable(tiny, "joint")
    assert {name for name, _ in named} == {name for name, _ in tiny.named_parameters()} - {"thresholds"}
    assert not tiny.thresholds.requires_grad
    rates = {id(p): group["lr"] for group in optimizer_groups(named, config) for p in group["params"]}
    assert len(rates) == len(named)
    for name, parameter in named:
        assert rates[id(parameter)] == (1e-3 if name.startswith("exits.") else 2e-5), name
    frozen_heads = optimizer_groups(set_trainable(tiny, "ce"), config)
    assert {group["lr"] for group in frozen_heads if group["params"]} == {2e-5}, "no head group without heads"


@pytest.mark.parametrize("with_teacher", [True, False])
def test_the_joint_loss_adds_the_sub_classifiers_mean_distillation(
    tiny: MagicPyramidForSequenceClassification, with_teacher: bool
) -> None:
    config = TrainConfig(model="unused", prune_teacher_weight=1.0, precision="fp32")
    batch = toy_batch(tiny, [1, 5, 7, 12])
    teacher = torch.randn(4, 2, generator=torch.Generator().manual_seed(2)) if with_teacher else None
    tiny.eval()
    set_trainable(tiny, "joint")
    out, loss = stage_loss(tiny, StageSpec(4, "joint", 1, "hard", "joint"), batch, config, teacher)
    _, main_only = stage_loss(tiny, StageSpec(3, "hard", 1, "hard", "ce"), batch, config, teacher)
    logits, exits = out.logits.detach().double(), out.exit_logits.detach().double()
    target = (teacher.double() if with_teacher else logits).softmax(dim=-1)
    kl = (target * (target.log() - exits.log_softmax(dim=-1))).sum(dim=-1).mean(dim=1)
    assert exits.shape[0] == 2 and bool((kl > 0).all())
    assert float(loss.detach()) == pytest.approx(float(main_only.detach()) + float(kl.mean()), rel=1e-5)
    tiny.zero_grad(set_to_none=True)
    loss.backward()
    first_layer = tiny.bert.encoder.layer[0].output.dense.weight.grad
    assert first_layer is not None and float(first_layer.abs().sum()) > 0, "the exits' loss reaches the backbone"
    assert all(p.grad is not None for name, p in tiny.named_parameters() if name.startswith("exits."))
    assert tiny.thresholds.grad is None
