"""Specification of ``bench.reference_report``: a reference trained apart from a recipe run, scored on the splits of
the run's dense record, only when both share stage 1's data and budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertForSequenceClassification

from bench.reference_report import main, report
from mp_model.recipe.data import encode
from mp_model.recipe.reference import REFERENCE_DIR, accuracy, train_reference
from mp_model.recipe.train_config import TrainConfig
from mp_model.recipe.training import load_data
from tests.utils import write_half_copy, write_tiny_model, write_toy_dataset


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """A tiny run directory holding only a trained reference."""
    root = tmp_path_factory.mktemp("reference_report")
    write_tiny_model(root / "base")
    write_toy_dataset(root / "toy.csv")
    config = TrainConfig(
        model=str(root / "base"),
        dataset=str(root / "toy.csv"),
        run_dir=str(root / "run"),
        train_size=None,
        dev_size=None,
        batch_size=8,
        max_length=48,
        lr=3e-3,
        epochs_finetune=2,
    )
    config.directory.mkdir(parents=True)
    train_reference(config, progress=False)
    return config


def recipe_file(path: Path, config: TrainConfig, dev: float, test: float, **changes: Any) -> Path:
    """An ``mp eval --json`` file whose dense record scored ``dev`` (selection split) and ``test``."""
    dense = {"method": "dense", "split": "test", "accuracy": test, "selected_on": "dev", "dev_accuracy": dev}
    mp = {"method": "mp", "split": "test", "accuracy": 0.5}
    train_config = config.to_dict() | {"lambdas": [9.0], "run_dir": "elsewhere", "precision": "bf16"} | changes
    payload = {"provenance": {"train_config": train_config, "git_commit": "abc"}, "records": [mp, dense]}
    path.write_text(json.dumps(payload))
    return path


def test_the_reference_is_scored_on_both_splits_of_the_dense_record(config: TrainConfig, tmp_path: Path) -> None:
    records, meta = report(
        config.directory, recipe_file(tmp_path / "r.json", config, 0.25, 0.75), device="cpu", batch_size=4
    )
    model = BertForSequenceClassification.from_pretrained(config.directory / REFERENCE_DIR)
    data = load_data(config)
    expected = {
        "dev": accuracy(model, data.dev, batch_size=4, device="cpu"),
        "test": accuracy(model, encode(data.tokenizer, data.dataset.test, 48), batch_size=4, device="cpu"),
    }
    assert {r["split"]: r["reference_accuracy"] for r in records} == pytest.approx(expected)
    for record in records:
        dense = {"dev": 0.25, "test": 0.75}[record["split"]]
        assert record["recipe_dense_accuracy"] == dense
        assert record["difference"] == pytest.approx(dense - record["reference_accuracy"])
        assert record["examples"] == len(data.dataset.split(record["split"]))
    assert meta["reference_train_config"]["lr"] == 3e-3 and meta["recipe_provenance"]["git_commit"] == "abc"


def test_a_reference_of_other_data_or_budget_is_refused_in_one_line(
    config: TrainConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = recipe_file(tmp_path / "r.json", config, 0.5, 0.5, epochs_finetune=3.0, seed=1)
    out = tmp_path / "out.json"
    assert main(["--run-dir", str(config.directory), "--recipe", str(recipe), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error == "reference_report: the reference and the recipe run differ in stage-1 settings: seed, epochs_finetune"
    )
    assert not out.exists()


def test_a_field_older_files_lack_counts_as_its_default(config: TrainConfig, tmp_path: Path) -> None:
    recipe = recipe_file(tmp_path / "r.json", config, 0.5, 0.5)
    payload = json.loads(recipe.read_text())
    del payload["provenance"]["train_config"]["dev_from_train"]  # saved before the field existed: 0
    recipe.write_text(json.dumps(payload))
    records, _ = report(config.directory, recipe, device="cpu", batch_size=4)
    assert [r["split"] for r in records] == ["test", "dev"]


def test_a_run_without_a_reference_is_refused_in_one_line(
    config: TrainConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = recipe_file(tmp_path / "r.json", config, 0.5, 0.5)
    assert main(["--run-dir", str(tmp_path), "--recipe", str(recipe), "--out", str(tmp_path / "o.json")]) == 2
    assert "has no reference: run `mp reference --run-dir" in capsys.readouterr().err


def test_a_half_precision_checkpoint_gives_a_reference_with_fp32_weights(config: TrainConfig, tmp_path: Path) -> None:
    half = write_half_copy(Path(config.model), tmp_path / "half")
    from_half = TrainConfig(**(config.to_dict() | {"model": str(half), "run_dir": str(tmp_path / "run")}))
    from_half.directory.mkdir(parents=True)
    result = train_reference(from_half, progress=False)
    model = BertForSequenceClassification.from_pretrained(from_half.directory / REFERENCE_DIR)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result["dev_accuracy"] > 0.6
