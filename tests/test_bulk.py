"""Specification of ``mp_model.recipe.bulk`` (the Ray Data engine): on a local Ray instance with two CPU workers
it gives the in-process engine's rows, each record exactly once; without Ray, ``--engine ray`` says how to install
it. Skipped where Ray Data is not installed (``pip install 'magic-pyramid[ray]'``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mp_model.recipe.cli import main
from mp_model.recipe.files import read_texts
from mp_model.recipe.predict import predict
from mp_model.recipe.runs import load_model, load_tokenizer
from tests.test_stream import mixed_texts, predict_argv, write_jsonl
from tests.utils import write_tiny_model

KNOBS = {"tau": 0.5, "threshold_scale": 1.0}


def test_without_ray_the_ray_engine_is_one_line_saying_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    source = write_jsonl(tmp_path / "in.jsonl", ["text"])
    assert main(["predict", str(source), "--engine", "ray", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'magic-pyramid[ray]'" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("bulk") / "model")


def test_the_ray_engine_gives_the_in_process_rows_each_record_once(ray_local, model_dir: Path, tmp_path: Path) -> None:
    texts = mixed_texts(300, seed=2)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(local), "--tau", "0.5")) == 0
    argv = predict_argv(source, model_dir, "--output", str(remote), "--tau", "0.5", "--engine", "ray")
    assert main([*argv, "--workers", "2", "--window", "32"]) == 0
    rows = [json.loads(line) for line in local.read_text().splitlines()]
    ray_rows = [json.loads(line) for line in remote.read_text().splitlines()]
    assert [row["index"] for row in ray_rows] == list(range(300))
    for row, ray_row in zip(rows, ray_rows, strict=True):
        assert_same_row(row, ray_row)


def assert_same_row(row: dict, other: dict) -> None:
    """The two rows agree exactly but for ``confidence``, printed to 6 decimals: batches of other compositions
    round the last float bits differently, which can move a value across a rounding boundary (one unit, 1e-6)."""
    assert {k: v for k, v in row.items() if k != "confidence"} == {k: v for k, v in other.items() if k != "confidence"}
    assert (row["confidence"] is None) == (other["confidence"] is None)
    assert row["confidence"] is None or other["confidence"] == pytest.approx(row["confidence"], abs=1.5e-6)


def test_predict_dataset_labels_a_ray_dataset_by_id(ray_local, model_dir: Path, tmp_path: Path) -> None:
    from mp_model.recipe.bulk import predict_dataset

    texts = read_texts(write_jsonl(tmp_path / "in.jsonl", mixed_texts(120, seed=3)))
    items = [{"id": f"r{text.index}", "text": text.text} for text in texts]
    ds = ray_local.data.from_items(items, override_num_blocks=4)
    labelled = predict_dataset(ds, model_dir, batch_tokens=96, workers=2, block_size=25, **KNOBS)
    out = {row["id"]: row for row in labelled.take_all()}
    assert sorted(out) == sorted(item["id"] for item in items)
    expected = predict(load_model(model_dir), load_tokenizer(model_dir), texts, **KNOBS)
    for row in expected:
        got = out[f"r{row['index']}"]
        assert_same_row({k: row[k] for k in got if k != "id"}, {k: v for k, v in got.items() if k != "id"})
    written = tmp_path / "parquet"
    labelled.write_parquet(str(written))
    assert ray_local.data.read_parquet(str(written)).count() == 120
