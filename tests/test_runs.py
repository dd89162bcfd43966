"""Specification of ``mp_model.recipe.runs``' reading of run files: damage is named, never a bare JSON error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mp_model import MagicPyramidForSequenceClassification
from mp_model.recipe.runs import CONFIG_FILE, STATE_FILE, finished_run_problem, load_checked, load_run, saved_config
from mp_model.saved_files import MANIFEST_FILE
from tests.utils import write_tiny_model, write_toy_dataset


@pytest.mark.parametrize(
    ("content", "message"),
    [("{broken", "is unreadable"), ("[1, 2]", "is damaged: it holds a JSON list, not an object")],
)
def test_a_damaged_train_config_names_the_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / CONFIG_FILE).write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / CONFIG_FILE} {message}"):
        saved_config(tmp_path)


def test_a_stage_folder_is_checked_against_the_checksum_its_run_records(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "stage4_exits")
    model, identity = load_checked(folder)
    (tmp_path / STATE_FILE).write_text(json.dumps({"stages_done": [4], "checksums": {"4": identity["weights_sha256"]}}))
    assert load_checked(folder)[1] == identity
    shutil.copy(write_tiny_model(tmp_path / "other", seed=1) / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="does not match its recorded SHA-256"):
        load_checked(folder)


def write_run(root: Path, state: object) -> Path:
    """A run folder (``train_config.json``) whose ``stage4_exits`` holds a tiny model and whose ``state.json`` is
    ``state`` (a JSON value, text written as is, or ``None``: no state.json)."""
    folder = write_tiny_model(root / "stage4_exits")
    (root / CONFIG_FILE).write_text("{}")
    if isinstance(state, str):
        (root / STATE_FILE).write_text(state)
    elif state is not None:
        (root / STATE_FILE).write_text(json.dumps(state))
    return folder


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_from_pretrained_checks_a_stage_folder_against_its_runs_recorded_checksum(tmp_path: Path) -> None:
    folder = write_run(tmp_path, None)
    (tmp_path / STATE_FILE).write_text(json.dumps({"stages_done": [4], "checksums": {"4": "0" * 64}}))
    with pytest.raises(ValueError, match=f"{folder}/model.safetensors does not match its recorded SHA-256"):
        MagicPyramidForSequenceClassification.from_pretrained(folder)


def test_a_stage_folders_config_is_checked_against_the_checksum_its_run_records(tmp_path: Path) -> None:
    folder = write_run(tmp_path, None)
    recorded = {"4": checksum(folder / "model.safetensors")}
    state = {"stages_done": [4], "checksums": recorded, "config_checksums": {"4": checksum(folder / "config.json")}}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert load_checked(folder)[0].config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    config = json.loads((folder / "config.json").read_text())  # labels swapped, as by a partial copy of another run
    config |= {"id2label": {"0": "LABEL_1", "1": "LABEL_0"}, "label2id": {"LABEL_1": 0, "LABEL_0": 1}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / MANIFEST_FILE).unlink()  # only the run's record can tell
    for load in (load_checked, MagicPyramidForSequenceClassification.from_pretrained):
        with pytest.raises(ValueError, match=f"{folder}/config.json does not match its recorded SHA-256"):
            load(folder)
    assert finished_run_problem(tmp_path) is not None


@pytest.mark.parametrize(
    ("state", "problem"),
    [(None, "is missing"), ('{"stages_done": [1,2', "is damaged"), ("[4]", "is damaged \\(it holds a JSON list")],
)
def test_a_stage_folder_of_a_run_without_a_readable_state_is_refused_naming_state_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str | None, problem: str
) -> None:
    from mp_model.recipe.cli import main

    folder = write_run(tmp_path / "run", state)
    expected = f"{tmp_path / 'run' / STATE_FILE} {problem}.*: the checksums of stage4_exits cannot be verified"
    for load in (load_checked, MagicPyramidForSequenceClassification.from_pretrained):
        with pytest.raises(ValueError, match=expected):
            load(folder)
    (tmp_path / "in.txt").write_text("a film\n")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "in.txt"), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and STATE_FILE in err and "Traceback" not in err, err


def test_a_run_with_a_damaged_state_says_so_and_that_training_would_start_over(tmp_path: Path) -> None:
    write_run(tmp_path, '{"stages_done": [1,2')
    with pytest.raises(ValueError, match=f"{tmp_path / STATE_FILE} is damaged .*`mp train` would start this run over"):
        load_run(tmp_path)
    assert "not done" not in (finished_run_problem(tmp_path) or "")


def test_training_records_the_checksums_of_each_stages_config_and_weights(tmp_path: Path) -> None:
    from mp_model.recipe.train_config import TrainConfig
    from mp_model.recipe.training import train

    write_tiny_model(tmp_path / "base")
    write_toy_dataset(tmp_path / "toy.csv", count=40)
    run = tmp_path / "run"
    settings = {"model": str(tmp_path / "base"), "dataset": str(tmp_path / "toy.csv"), "run_dir": str(run)}
    config = TrainConfig(**settings, train_size=None, dev_size=None, batch_size=8, max_length=32, epochs_finetune=1)
    state = train(config, stages=[1], progress=False)
    stage = run / "stage1_finetune"
    assert state["checksums"]["1"] == checksum(stage / "model.safetensors")
    assert state["config_checksums"]["1"] == checksum(stage / "config.json")
    assert json.loads((stage / MANIFEST_FILE).read_text()) == {
        "config.json": checksum(stage / "config.json"),
        "model.safetensors": checksum(stage / "model.safetensors"),
    }
    assert load_checked(stage)[1]["weights_sha256"] == state["checksums"]["1"]
