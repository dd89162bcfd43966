"""Specification of ``mp_model.checkpoint``: a saved model is read whole into memory, checked, and owns its bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mp_model import MagicPyramidForSequenceClassification
from mp_model.checkpoint import load_snapshot, read_snapshot
from mp_model.permissions import apply_umask, umask_mode
from tests.utils import write_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoint")
    return write_tiny_model(root / "a", seed=0), write_tiny_model(root / "b", seed=1)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_snapshot_builds_the_model_from_pretrained_builds(models: tuple[Path, Path]) -> None:
    folder = models[0]
    snapshot = read_snapshot(folder)
    assert snapshot.weights_sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    model, expected = load_snapshot(snapshot), MagicPyramidForSequenceClassification.from_pretrained(str(folder))
    assert model.config.id2label == expected.config.id2label
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_loaded_model_does_not_change_when_its_file_is_overwritten_in_place(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = shutil.copytree(models[0], tmp_path / "copy")
    model = load_snapshot(read_snapshot(folder))
    before = weights_of(model)
    with (folder / "model.safetensors").open("r+b") as file:  # `cp` over it: same inode, new bytes
        file.write((models[1] / "model.safetensors").read_bytes())
    after = weights_of(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_checksum_that_does_not_match_is_refused_naming_the_file(models: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="model.safetensors does not match its recorded SHA-256"):
        read_snapshot(models[0], checksum="0" * 64)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_config", "no config.json"),
        ("no_weights", "no model.safetensors"),
        ("bad_config", "config.json is not valid JSON"),
        ("list_config", "config.json does not hold a JSON object"),
        ("bad_weights", "model.safetensors is damaged"),
    ],
)
def test_a_damaged_folder_is_refused_naming_the_file(
    models: tuple[Path, Path], tmp_path: Path, damage: str, message: str
) -> None:
    folder = shutil.copytree(models[0], tmp_path / "copy")
    {
        "no_config": lambda: (folder / "config.json").unlink(),
        "no_weights": lambda: (folder / "model.safetensors").unlink(),
        "bad_config": lambda: (folder / "config.json").write_text("{not json"),
        "list_config": lambda: (folder / "config.json").write_text("[1, 2]"),
        "bad_weights": lambda: (folder / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 40),
    }[damage]()
    with pytest.raises(ValueError, match=message):
        read_snapshot(folder)


def test_from_pretrained_on_a_folder_without_config_names_the_folder(models: tuple[Path, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(models[0], tmp_path / "copy")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{folder} holds no config.json"):
        MagicPyramidForSequenceClassification.from_pretrained(str(folder))


def test_saved_files_get_the_process_umask_not_a_private_mode(models: tuple[Path, Path], tmp_path: Path) -> None:
    model = MagicPyramidForSequenceClassification.from_pretrained(str(models[0]))
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "saved")
        apply_umask(tmp_path / "saved")
        assert umask_mode() == 0o644
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "saved").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644


def test_the_tokenizer_comes_from_the_same_snapshot_and_counts_in_its_identity(tmp_path: Path) -> None:
    from mp_model.checkpoint import load_snapshot_tokenizer
    from mp_model.recipe.runs import load_checked_with_tokenizer

    folder = write_tiny_model(tmp_path / "model")
    _, tokenizer, identity = load_checked_with_tokenizer(folder)
    assert tokenizer("a moving film").input_ids == AutoTokenizer.from_pretrained(folder)("a moving film").input_ids
    config = folder / "tokenizer_config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps(values | {"do_lower_case": not values.get("do_lower_case", True)}))
    assert load_checked_with_tokenizer(folder)[2]["tokenizer_sha256"] != identity["tokenizer_sha256"]
    assert load_snapshot_tokenizer(read_snapshot(folder)) is not None


def test_a_folder_without_a_vocabulary_is_refused_naming_it(tmp_path: Path) -> None:
    from mp_model.recipe.runs import load_checked_with_tokenizer

    folder = write_tiny_model(tmp_path / "model")
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=f"{folder} holds no tokenizer vocabulary"):
        load_checked_with_tokenizer(folder)
