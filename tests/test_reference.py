"""Specification of ``mp reference``: a damaged run file or a blocked target is refused before training, and the
kept epoch follows the rule of the recipe's stage 1 (``keeps_epoch``: ties go to the later epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from mp_model.recipe.cli import main
from mp_model.recipe.fit import keeps_epoch
from mp_model.recipe.reference import REFERENCE_DIR, train_reference
from mp_model.recipe.runs import CONFIG_FILE
from mp_model.recipe.train_config import TrainConfig
from tests.utils import write_tiny_model, write_toy_dataset


@pytest.mark.parametrize(
    ("content", "message"), [("{broken", "is unreadable"), ("[]", "is damaged: it holds a JSON list")]
)
def test_a_damaged_train_config_is_one_line_naming_it(tmp_path: Path, capsys, content: str, message: str) -> None:
    (tmp_path / CONFIG_FILE).write_text(content)
    assert main(["reference", "--run-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / CONFIG_FILE} {message}" in err and err.count("\n") == 1


def test_a_file_in_place_of_the_reference_folder_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    config = TrainConfig(
        model=str(write_tiny_model(tmp_path / "base")),
        dataset=str(write_toy_dataset(tmp_path / "toy.csv")),
        run_dir=str(tmp_path / "run"),
    )
    config.directory.mkdir()
    (config.directory / REFERENCE_DIR).write_text("not a folder")
    monkeypatch.setattr("mp_model.recipe.reference.load_data", lambda *_: pytest.fail("trained"))
    with pytest.raises(ValueError, match="reference is a file, not a folder"):
        train_reference(config, progress=False)
    assert sorted(path.name for path in config.directory.iterdir()) == [REFERENCE_DIR]


def test_the_best_epoch_rule_keeps_the_later_epoch_on_a_tie() -> None:
    assert keeps_epoch(0.5, None) and keeps_epoch(0.5, 0.5) and keeps_epoch(0.6, 0.5)
    assert not keeps_epoch(0.4, 0.5)


@pytest.mark.parametrize(("scores", "kept"), [((0.5, 0.5, 0.5), 3), ((0.5, 0.7, 0.6), 2), ((0.7, 0.5, 0.7), 3)])
def test_the_reference_keeps_the_epoch_stage_1_would_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scores: tuple[float, ...], kept: int
) -> None:
    config = TrainConfig(
        model=str(write_tiny_model(tmp_path / "base")),
        dataset=str(write_toy_dataset(tmp_path / "toy.csv")),
        run_dir=str(tmp_path / "run"),
        train_size=None,
        dev_size=None,
        batch_size=8,
        max_length=48,
        epochs_finetune=len(scores),
    )
    config.directory.mkdir()
    dev_scores, weights = iter(scores), []

    def scored(model: torch.nn.Module, *_, **__) -> float:
        weights.append(model.classifier.weight.detach().clone())
        return next(dev_scores)

    monkeypatch.setattr("mp_model.recipe.reference.accuracy", scored)
    result = train_reference(config, progress=False)
    assert (result["epoch"], result["dev_accuracy"]) == (kept, scores[kept - 1])
    assert [point["dev_accuracy"] for point in result["grid"]] == list(scores)
    saved = BertForSequenceClassification.from_pretrained(config.directory / REFERENCE_DIR)
    assert torch.equal(saved.classifier.weight, weights[kept - 1])
