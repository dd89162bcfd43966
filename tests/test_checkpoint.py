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
    other = MagicPyramidForSequenceClassification.from_pretrained(write_tiny_model(root / "b", seed=1))
    other.config.id2label, other.config.label2id = {0: "BAD", 1: "GOOD"}, {"BAD": 0, "GOOD": 1}
    other.save_pretrained(root / "b")  # labels of its own: its config.json differs from a's
    return write_tiny_model(root / "a", seed=0), root / "b"


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


def test_save_pretrained_writes_last_a_manifest_of_the_config_and_the_weights(models: tuple[Path, Path]) -> None:
    recorded = json.loads((models[0] / "checksums.json").read_text())
    for name in ("config.json", "model.safetensors"):
        assert recorded[name] == hashlib.sha256((models[0] / name).read_bytes()).hexdigest()


def loaders() -> tuple:
    """Every way to load a model folder: the CLI's snapshot, its checked load, and ``from_pretrained``."""
    from mp_model.recipe.runs import load_checked

    return read_snapshot, load_checked, MagicPyramidForSequenceClassification.from_pretrained


@pytest.mark.parametrize("first", ["model.safetensors", "config.json"])
def test_a_folder_copied_over_in_parts_is_refused_by_every_loader_until_it_is_whole(
    models: tuple[Path, Path], tmp_path: Path, first: str
) -> None:
    folder = shutil.copytree(models[0], tmp_path / "live")
    shutil.copy(models[1] / first, folder / first)  # `cp B/first live/`: a job starting now must not mix A and B
    for load in loaders():
        with pytest.raises(ValueError, match=f"{folder}.*: its files are not from one save .*try again"):
            load(folder)
    for name in ("config.json", "model.safetensors", "checksums.json"):
        shutil.copy(models[1] / name, folder / name)
    assert read_snapshot(folder).weights_sha256 == read_snapshot(models[1]).weights_sha256


def test_a_folder_saved_before_the_manifest_existed_still_loads(models: tuple[Path, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(models[0], tmp_path / "old")
    (folder / "checksums.json").unlink()
    for load in loaders():
        assert load(folder) is not None
    assert read_snapshot(folder).weights_sha256 == read_snapshot(models[0]).weights_sha256


def test_a_damaged_manifest_is_refused_naming_it(models: tuple[Path, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(models[0], tmp_path / "copy")
    (folder / "checksums.json").write_text("[1")
    with pytest.raises(ValueError, match="checksums.json is damaged"):
        MagicPyramidForSequenceClassification.from_pretrained(folder)


def logits_of(model: MagicPyramidForSequenceClassification) -> torch.Tensor:
    ids = torch.tensor([[101, 7, 8, 9, 10, 102]])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids)).logits.clone()


@pytest.mark.parametrize("change", ["truncate", "overwrite"])
def test_from_pretrained_owns_its_bytes_the_file_can_change_after_loading(
    models: tuple[Path, Path], tmp_path: Path, change: str
) -> None:
    folder = shutil.copytree(models[0], tmp_path / "copy")
    model = MagicPyramidForSequenceClassification.from_pretrained(folder).eval()
    before, weights = logits_of(model), weights_of(model)
    with (folder / "model.safetensors").open("r+b") as file:  # same inode: a mapping would see it (or SIGBUS)
        if change == "truncate":
            file.truncate(0)
        else:
            file.write((models[1] / "model.safetensors").read_bytes())
    assert torch.equal(logits_of(model), before)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())


def test_from_pretrained_owns_the_bytes_of_a_plain_bert_folder_and_keeps_its_keywords(tmp_path: Path) -> None:
    from tests.utils import write_toy_bert

    folder = write_toy_bert(tmp_path / "bert")
    model = MagicPyramidForSequenceClassification.from_pretrained(folder, num_labels=3, exit_tau=0.25)
    assert (model.classifier.out_features, model.config.exit_tau, model.dtype) == (3, 0.25, torch.float32)
    assert model.name_or_path == str(folder)
    weights = weights_of(model)
    with (folder / "model.safetensors").open("r+b") as file:
        file.truncate(0)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    half = MagicPyramidForSequenceClassification.from_pretrained(write_toy_bert(tmp_path / "b16"), dtype=torch.bfloat16)
    assert half.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("list_config", "config.json does not hold a JSON object"),
        ("bad_config", "config.json is not valid JSON"),
        ("truncated_weights", "model.safetensors is damaged \\(.*incomplete metadata"),
        ("empty_weights", "model.safetensors is damaged \\(.*header too small"),
        ("garbage_weights", "model.safetensors is damaged"),
        ("weights_folder", "model.safetensors is not a file"),
    ],
)
def test_from_pretrained_names_a_damaged_file_before_any_work(
    models: tuple[Path, Path], tmp_path: Path, damage: str, message: str
) -> None:
    folder = shutil.copytree(models[0], tmp_path / "copy")
    (folder / "checksums.json").unlink()  # damage as a folder saved without a manifest would show it
    weights = folder / "model.safetensors"
    {
        "list_config": lambda: (folder / "config.json").write_text("[1, 2]"),
        "bad_config": lambda: (folder / "config.json").write_text('{"model_type": '),
        "truncated_weights": lambda: weights.write_bytes(weights.read_bytes()[:-100]),
        "empty_weights": lambda: weights.write_bytes(b""),
        "garbage_weights": lambda: weights.write_bytes(bytes(range(256)) * 16),
        "weights_folder": lambda: (weights.unlink(), weights.mkdir()),
    }[damage]()
    with pytest.raises(ValueError, match=f"{folder}/{message}"):
        MagicPyramidForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize("where", ["missing", "file"])
def test_from_pretrained_on_a_missing_local_folder_says_so_not_hub_repo_id(tmp_path: Path, where: str) -> None:
    path = tmp_path / "nope"
    if where == "file":
        path.write_text("x")
    expected = "no such folder" if where == "missing" else "not a folder"
    for source in (path, str(path)):
        with pytest.raises(ValueError, match=f"{path} is not a saved model: {expected}"):
            MagicPyramidForSequenceClassification.from_pretrained(source)


def test_from_pretrained_copies_the_weights_of_a_bin_folder_out_of_the_file(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    folders = []
    for source in models:  # weights saved as pytorch_model.bin only, which torch.load maps
        folder = tmp_path / source.name
        folder.mkdir()
        shutil.copy(source / "config.json", folder / "config.json")
        torch.save(load_snapshot(read_snapshot(source)).state_dict(), folder / "pytorch_model.bin")
        folders.append(folder)
    model, info = MagicPyramidForSequenceClassification.from_pretrained(folders[0], output_loading_info=True)
    weights = weights_of(model)
    with (folders[0] / "pytorch_model.bin").open("r+b") as file:
        file.write((folders[1] / "pytorch_model.bin").read_bytes())
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert not info["missing_keys"]
