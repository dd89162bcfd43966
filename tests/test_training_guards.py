"""Specification of the recipe's guards before training: one trainer per run folder, a warning for a class with no
training example."""

from __future__ import annotations

from pathlib import Path

import pytest

from mp_model.recipe.runs import TrainingWarning
from mp_model.recipe.training import load_data, train
from tests.test_training import tiny_config
from tests.utils import write_tiny_model, write_toy_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("guards")
    write_tiny_model(folder / "base")
    write_toy_dataset(folder / "toy.csv")
    return folder


def test_a_run_folder_being_trained_refuses_a_second_trainer_at_once(root: Path) -> None:
    from mp_model.recipe.locks import LockedError, exclusive_lock

    config = tiny_config(root, "locked")
    config.directory.mkdir()
    with exclusive_lock(config.directory, "the test"):
        with pytest.raises(LockedError, match=f"the run folder {config.directory} is in use by process"):
            train(config, progress=False)
    assert list(config.directory.iterdir()) == []


def test_a_class_without_a_training_example_is_a_warning(root: Path, tmp_path: Path) -> None:
    rows = ["text,label,split"]
    rows += [f"good words {i},{'pos' if i % 2 else 'neg'},train" for i in range(12)]
    rows += ["rare words,rare,dev", "good words dev,pos,dev", "words test,neg,test"]
    (tmp_path / "rare.csv").write_text("\n".join(rows) + "\n")
    config = tiny_config(root, "rare", dataset=str(tmp_path / "rare.csv"))
    with pytest.warns(TrainingWarning, match="class\\(es\\) 'rare' have no training example"):
        load_data(config)
