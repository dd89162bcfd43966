"""Specification of ``mp_model.recipe.stream`` (streaming ``mp predict``): every record labelled exactly once and
written in input order, window by window; an interrupted run resumed with ``--resume`` loses and repeats nothing,
even after a torn last write."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
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


def killed_after_windows(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make ``mp predict``'s in-process labeller raise ``Interrupted`` on its window ``count + 1``."""
    import mp_model.recipe.predict as predict_module

    real = predict_module.window_labeller

    def labeller(*args, **kwargs):
        label, calls = real(*args, **kwargs), []

        def interrupted(texts, stats):
            calls.append(1)
            if len(calls) > count:
                raise Interrupted
            return label(texts, stats)

        return interrupted

    monkeypatch.setattr(predict_module, "window_labeller", labeller)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_interrupted_run_resumes_without_losing_or_repeating_a_record(
    model_dir: Path, tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = mixed_texts(90, seed=1)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    clean, target = tmp_path / f"clean{suffix}", tmp_path / f"out{suffix}"
    assert main(predict_argv(source, model_dir, "--output", str(clean))) == 0

    fields = row_fields(False)
    killed_after_windows(monkeypatch, 2)  # killed after 2 whole windows, while labelling the third
    assert main(predict_argv(source, model_dir, "--output", str(target), "--max-batch-tokens", "128")) == 1
    monkeypatch.undo()
    assert written_records(target, fields, target.suffix[1:]) == 32
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
    texts = mixed_texts(20)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    target = tmp_path / "out.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(target))) == 0
    other = write_jsonl(tmp_path / "other.jsonl", mixed_texts(30, seed=5))
    capsys.readouterr()
    assert main(predict_argv(other, model_dir, "--output", str(target), "--resume")) == 2
    assert f"the input {other} changed since {target} was begun" in capsys.readouterr().err
    edited = [*texts]  # one early record edited, same size: the file's hash tells
    edited[3] = edited[3][::-1]
    write_jsonl(source, edited)
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume")) == 2
    assert "changed since" in capsys.readouterr().err
    target.write_text('{"index": 0}\n{"index": 5}\n')
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume")) == 2
    assert "record 1 holds index 5" in capsys.readouterr().err


def test_resume_checks_every_written_record_not_only_the_last(model_dir: Path, tmp_path: Path) -> None:
    texts = mixed_texts(20)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    target = tmp_path / "out.jsonl"
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    label = window_labeller(model, tokenizer, pairs=False)
    fields = row_fields(False)
    stream_predict(label, open_texts(source), target, fields, window=8, progress=False)
    write_jsonl(source, [*texts[:3], "an edited record", *texts[4:]])
    with pytest.raises(ValueError, match="output record 3 does not match input record 3 \\(line 4\\)"):
        stream_predict(label, open_texts(source), target, fields, resume=True, progress=False)
    shorter = write_jsonl(tmp_path / "short.jsonl", texts[:10])
    with pytest.raises(ValueError, match="holds 20 records but the input only 10"):
        stream_predict(label, open_texts(shorter), target, fields, resume=True, progress=False)


def test_resume_refuses_the_same_weights_with_another_tokenizer(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(40))
    target = tmp_path / "out.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(target))) == 0
    changed = Path(shutil.copytree(model_dir, tmp_path / "changed"))
    config = changed / "tokenizer_config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps(values | {"do_lower_case": not values.get("do_lower_case", True)}))
    capsys.readouterr()
    assert main(predict_argv(source, changed, "--output", str(target), "--resume")) == 2
    assert "tokenizer_sha256" in capsys.readouterr().err


def test_resume_refuses_another_model_or_other_knobs(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(40))
    target = tmp_path / "out.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(target))) == 0
    other = write_tiny_model(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert main(predict_argv(source, other, "--output", str(target), "--resume")) == 2
    assert f"was begun by another model ({model_dir}" in capsys.readouterr().err
    argv = predict_argv(source, model_dir, "--output", str(target), "--resume", "--tau", "0.95")
    assert main([*argv, "--threshold-scale", "3"]) == 2
    err = capsys.readouterr().err
    assert "other knobs" in err and "tau 0.5 then, 0.95 now" in err and "threshold_scale 1.0 then, 3.0 now" in err
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume", "--no-prune")) == 2
    assert "prune True then, False now" in capsys.readouterr().err
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume", "--tau", "0.5")) == 0


def test_the_output_records_its_model_knobs_and_input(model_dir: Path, tmp_path: Path) -> None:
    import hashlib

    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(40))
    target = tmp_path / "out.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(target), "--tau", "0.4")) == 0
    record = json.loads((tmp_path / "out.jsonl.provenance.json").read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    assert record["model"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["knobs"] | {"max_length": None} == {
        "tau": 0.4, "threshold_scale": 1.0, "max_length": None, "prune": True, "early_exit": True,
        "column": "text", "pair_column": None,
    }  # fmt: skip
    assert record["input"] == {
        "path": str(source),
        "size": source.stat().st_size,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    assert record["records"]["count"] == 40


def test_resume_refuses_an_output_without_provenance(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(20))
    target = tmp_path / "out.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(target))) == 0
    (tmp_path / "out.jsonl.provenance.json").unlink()
    capsys.readouterr()
    assert main(predict_argv(source, model_dir, "--output", str(target), "--resume")) == 2
    assert "has no out.jsonl.provenance.json" in capsys.readouterr().err


def test_a_second_writer_of_one_output_fails_at_once_naming_the_holder(model_dir: Path, tmp_path: Path, capsys) -> None:
    from mp_model.recipe.locks import exclusive_lock

    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(20))
    target = tmp_path / "out.jsonl"
    with exclusive_lock(target, "the test"):
        for more in ((), ("--resume",)):
            assert main(predict_argv(source, model_dir, "--output", str(target), *more)) == 2
            assert f"--output {target} is in use by process {os.getpid()}" in capsys.readouterr().err
    assert target.read_bytes() == b""
    assert main(predict_argv(source, model_dir, "--output", str(target))) == 0  # released


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


def test_a_lone_surrogate_is_one_line_naming_file_and_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = write_utf8(tmp_path / "in.jsonl", '{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')
    assert main(predict_argv(source, model_dir, "--output", str(tmp_path / "out.jsonl"))) == 2
    err = capsys.readouterr().err
    assert f"{source}, line 2: 'text' must be a string, got a lone surrogate" in err and err.count("\n") == 1


def test_tau_defaults_to_the_models_own_exit_tau(model_dir: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", mixed_texts(30))
    default, explicit = tmp_path / "default.jsonl", tmp_path / "explicit.jsonl"
    assert main(predict_argv(source, model_dir, "--output", str(default))) == 0
    tau = load_model(model_dir).config.exit_tau
    assert main(predict_argv(source, model_dir, "--output", str(explicit), "--tau", str(tau))) == 0
    assert default.read_bytes() == explicit.read_bytes()
    assert json.loads((tmp_path / "default.jsonl.provenance.json").read_text())["knobs"]["tau"] == tau
