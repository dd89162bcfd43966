"""Specification of a resumed stage's recorded metrics: a run interrupted inside a stage and resumed records the same
metrics as an uninterrupted run (not only the same weights), because the epoch's running totals travel in the partial
checkpoint; a checkpoint without them cannot give those metrics, so it is discarded and its stage restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mp_model.recipe.runs import PARTIAL_DIR, STATE_FILE, TrainingWarning, sha256
from mp_model.recipe.train_config import TrainConfig
from mp_model.recipe.training import train
from tests.test_training import Crash, assert_same_weights, crash_at, load, stage_dir, tiny_config
from tests.utils import write_tiny_model, write_toy_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    write_tiny_model(folder / "base")
    write_toy_dataset(folder / "toy.csv")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(root: Path) -> TrainConfig:
    """Stages 1-3 run without interruption."""
    config = tiny_config(root, "uninterrupted")
    train(config, [1, 2, 3], progress=False)
    return config


def state(config: TrainConfig) -> dict:
    return json.loads((config.directory / STATE_FILE).read_text())


def test_a_run_resumed_inside_stage3_records_the_uninterrupted_runs_stage3_metrics(
    root: Path, uninterrupted: TrainConfig
) -> None:
    config = tiny_config(root, "resumed_stage3")
    callback, _ = crash_at("checkpoint", stage=3, step=5)
    with pytest.raises(Crash):
        train(config, [1, 2, 3], callback=callback, progress=False)
    progress = json.loads((config.directory / PARTIAL_DIR / "progress.json").read_text())
    assert (progress["step"], progress["total"]) == (5, 10), "the crash must fall inside the stage's one epoch"
    train(config, [1, 2, 3], progress=False)
    resumed, expected = state(config)["stage3"], state(uninterrupted)["stage3"]
    assert resumed == expected
    assert {"train_loss", "train_accuracy", "train_kept_ratio"} <= set(resumed)
    assert_same_weights(load(stage_dir(config, 3)), load(stage_dir(uninterrupted, 3)))


def test_a_partial_checkpoint_without_the_epochs_running_totals_restarts_its_stage(
    root: Path, uninterrupted: TrainConfig
) -> None:
    config = tiny_config(root, "no_totals")
    callback, _ = crash_at("checkpoint", stage=1, step=5)
    with pytest.raises(Crash):
        train(config, [1], callback=callback, progress=False)
    partial = config.directory / PARTIAL_DIR
    saved = torch.load(partial / "trainer.pt", weights_only=False)
    del saved["totals"]  # as written before the totals were checkpointed
    torch.save(saved, partial / "trainer.pt")
    progress = json.loads((partial / "progress.json").read_text())
    (partial / "progress.json").write_text(json.dumps(progress | {"sha256": sha256(partial / "trainer.pt")}))
    with pytest.warns(TrainingWarning, match="discarding the partial checkpoint .*lacks the trainer's state"):
        train(config, [1], progress=False)
    assert state(config)["stage1"] == state(uninterrupted)["stage1"]
    assert_same_weights(load(stage_dir(config, 1)), load(stage_dir(uninterrupted, 1)))
