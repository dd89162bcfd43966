"""Specification of ``mp_model.recipe.stream`` (streaming ``mp predict``): every record labelled exactly once and
written in input order, window by window; an interrupted run resumed with ``--resume`` loses and repeats nothing,
even after a torn last write."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

from mp_model.recipe.cli import main
from mp_model.recipe.files import open_texts
from mp_model.recipe.predict import row_fields, window_labeller
from mp_model.recipe.runs import load_model, load_tokenizer
from mp_model.recipe.stream import stream_predict, written_records
from tests.utils import GOOD, write_tiny_model, write_utf8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("stream") / "model")


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """Texts of mixed lengths: blank, whitespace, very long (past truncation), non-ASCII, with U+2028 inside."""
    rng = random.Random(seed)
    special = ["", "   ", "été à Zürich ünïcödé 日本語のテキスト", "one\u2028line", " ".join(GOOD * 40)]
    return [special[i % 5] if i % 7 == 0 else " ".join(rng.choices(GOOD, k=rng.randint(1, 30))) for i in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    return write_utf8(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def predict_argv(source: Path, model_dir: Path, *more: str) -> list[str]:
    return ["predict", str(source), "--checkpoint", str(model_dir), "--no-progress", "--window", "16", *more]


def test_streaming_writes_every_record_once_in_input_order(model_dir: Path, tmp_path: Path) -> None:
    texts = mixed_texts(100)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    target = tmp_path / "out.jsonl"
    argv = predict_argv(source, model_dir, "--output", str(target), "--max-batch-tokens", "64")
    assert main(argv) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(row["index"], row["line"], row["text"]) for row in rows] == [
        (i, i + 1, t if t.strip() else "") for i, t in enumerate(texts)
    ]
    assert [row["label"] is None for row in rows] == [not t.strip() for t in texts]
    assert all(1 <= row["exit_layer"] <= 3 for row in rows if row["label"] is not None)
    whole = tmp_path / "whole.jsonl"  # one window, large batches: the same rows
    assert main(predict_argv(source, model_dir, "--output", str(whole), "--window", "4096")) == 0
    assert [json.loads(line) for line in whole.read_text().splitlines()] == rows


class Interrupted(Exception):
    pass


def interrupted_after(texts, count: int):
    """``texts``, then an ``Interrupted`` error after ``count`` of them (a run killed while reading)."""
    for position, text in enumerate(texts):
        if position == count:
            raise Interrupted
        yield text


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_interrupted_run_resumes_without_losing_or_repeating_a_record(
    model_dir: Path, tmp_path: Path, suffix: str
) -> None:
    texts = mixed_texts(90, seed=1)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    clean, target = tmp_path / f"clean{suffix}", tmp_path / f"out{suffix}"
    assert main(predict_argv(source, model_dir, "--output", str(clean))) == 0

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    file = open_texts(source)
    label = window_labeller(model, tokenizer, pairs=file.pairs, batch_tokens=128, batch_size=64)
    fields = row_fields(file.pairs)
    with pytest.raises(Interrupted):  # killed after 2 whole windows and part of the third
        stream_predict(label, interrupted_after(file, 40), target, fields, window=16, progress=False)
    assert written_records(target, fields, target.suffix[1:])[0] == 32
    with target.open("ab") as out:  # and a torn write: half a record, no line break
        out.write(clean.read_bytes()[len(target.read_bytes()) :][:25])
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume")) == 0
    assert target.read_bytes() == clean.read_bytes()
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume")) == 0  # done: nothing added
    assert target.read_bytes() == clean.read_bytes()
    if suffix == ".csv":
        with target.open(newline="") as table:
            assert [int(row["index"]) for row in csv.DictReader(table)] == list(range(90))


def test_resume_refuses_an_output_of_another_input(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(20))
    target = tmp_path / "out.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(target))) == 0
    other = write_jsonl(tmp_path / "other.jsonl", mixed_texts(30, seed=5))
    capsys.readouterr()
    assert main(predict_argv(other, model_dir, "--output", str(target), "--resume")) == 2
    assert "does not match input record 19" in capsys.readouterr().err
    shorter = write_jsonl(tmp_path / "short.jsonl", mixed_texts(10))
    assert main(predict_argv(shorter, model_dir, "--output", str(target), "--resume")) == 2
    assert "holds 20 records but the input only 10" in capsys.readouterr().err
    target.write_text('{"index": 0}\n{"index": 5}\n')
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume")) == 2
    assert "record 1 holds index 5" in capsys.readouterr().err


def test_the_progress_bar_shows_records_exit_layer_and_kept_tokens(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(40))
    argv = [a for a in predict_argv(source, model_dir, "--output", str(tmp_path / "o.jsonl")) if a != "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "40/" not in err and "40 records" in err and "exit=" in err and "kept=" in err


def test_native_caches_are_bounded_unless_the_user_chose_a_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from mp_model.recipe.stream import PRIMITIVE_CACHE, bound_native_caches, release_free_memory

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_native_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(PRIMITIVE_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    bound_native_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
    release_free_memory()  # glibc's malloc_trim here, nothing elsewhere: never an error
