"""Specification of ``mp_model.recipe.runs``' reading of run files: damage is named, never a bare JSON error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mp_model.recipe.runs import CONFIG_FILE, STATE_FILE, load_checked, saved_config
from tests.utils import write_tiny_model


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
