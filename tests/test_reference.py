"""Specification of ``mp reference``'s checks: a damaged run file or a blocked target is refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest

from mp_model.recipe.cli import main
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
