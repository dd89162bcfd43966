"""Specification of ``mp_model.recipe.files``: a user's labelled files (``load_file``) and texts to label
(``read_texts``): labels matched to a model's by name or id, never re-sorted; one record per input record, in
order, lines ending only at ``\\n`` or ``\\r\\n``; strict CSV quotes; JSON values that are not strings refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mp_model.recipe.data import SPLITS, TextExample
from mp_model.recipe.datasets import load_dataset
from mp_model.recipe.files import load_file, open_texts, read_texts
from mp_model.recipe.records import lone_surrogate, split_lines
from tests.utils import HYPOTHESIS_SETTINGS, label_counts, labelled_csv, split_sizes, write_utf8

BREAKS = ["\u2028", "\u2029", "\x0c", "\x85", "\x0b", "\x1c", "\r"]


# Labels are matched to the model's, by name or by id


def test_a_files_label_names_are_matched_to_the_models_not_sorted(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "rt.csv", ["fresh", "rotten"])
    assert load_file(path).labels == ["fresh", "rotten"]  # on its own, sorted
    dataset = load_file(path, labels=["rotten", "fresh"])
    assert dataset.labels == ["rotten", "fresh"]
    examples = [e for split in ("train", "dev", "test") for e in dataset.split(split)]
    assert all(e.label == (1 if int(e.text.split()[1]) % 2 == 0 else 0) for e in examples)


def test_a_files_integer_labels_are_taken_as_the_models_ids(tmp_path: Path) -> None:
    dataset = load_file(labelled_csv(tmp_path / "ids.csv", ["1", "0"]), labels=["rotten", "fresh"])
    assert {e.text: e.label for e in dataset.train}["text 0"] == 1


def test_a_label_the_model_does_not_know_is_an_error_naming_file_line_and_labels(tmp_path: Path) -> None:
    path = labelled_csv(tmp_path / "bbc.csv", ["business", "tech", "sports"])
    with pytest.raises(ValueError, match=r"bbc.csv, line 2: label 'business' is not one of the model's labels"):
        load_file(path, labels=["rotten", "fresh"])
    with pytest.raises(ValueError, match=r"line 4: label '2' is not one of .* nor an id 0..1"):
        load_file(labelled_csv(tmp_path / "three.csv", ["0", "1", "2"]), labels=["rotten", "fresh"])
    with pytest.raises(ValueError, match=r"bbc_news has labels \['business'.*the model's labels are"):
        load_dataset("bbc_news", labels=["rotten", "fresh"])


# One record per input record, in order


def test_lines_end_only_at_newline_or_crlf() -> None:
    assert split_lines("a\u2028b\x0cc\x85d\re\r\nf\n\ng") == ["a\u2028b\x0cc\x85d\re", "f", "", "g"]
    assert split_lines("a\n") == ["a"] and split_lines("") == []


def test_unicode_line_breaks_stay_inside_a_text_and_a_jsonl_record(tmp_path: Path) -> None:
    texts = [f"one{mark}still one" for mark in BREAKS]
    rows = read_texts(write_utf8(tmp_path / "t.txt", "\n".join(texts) + "\n"))
    assert [row.text for row in rows] == texts
    records = "".join(json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    dataset = load_file(write_utf8(tmp_path / "t.jsonl", records * 3))
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
    jsonl = read_texts(write_utf8(tmp_path / "t.jsonl", '{"text": "a"}\n\n{"text": " "}\n{"text": "b"}\n'))
    assert [(r.index, r.line, r.text) for r in jsonl] == [(0, 1, "a"), (1, 2, ""), (2, 3, ""), (3, 4, "b")]
    table = read_texts(write_utf8(tmp_path / "t.csv", 'id,text\n1,a\n\n2,"two\nlines"\n3,b\n'))
    assert [(r.index, r.line, r.text) for r in table] == [(0, 2, "a"), (1, 3, ""), (2, 4, "two\nlines"), (3, 6, "b")]


def test_an_unbalanced_csv_quote_is_an_error_at_its_line(tmp_path: Path) -> None:
    content = 'text,label\nfine,0\n"never closed,1\nnext,0\nlast,1\n'
    for reader in (read_texts, load_file):
        with pytest.raises(ValueError, match=r"t.csv, line 3: malformed CSV.*runs to line"):
            reader(write_utf8(tmp_path / "t.csv", content))
    with pytest.raises(ValueError, match=r"line 2: malformed TSV"):
        read_texts(write_utf8(tmp_path / "t.tsv", 'text\n"closed" early\nnext\n'))


def test_a_csv_row_with_too_many_fields_is_an_error_not_a_cut_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"line 3: 2 fields where the header has 1"):
        read_texts(write_utf8(tmp_path / "t.csv", "text\nfine\nhello, world\n"))


@pytest.mark.parametrize("value", ["null", "true", "3", '["a", "b"]', '{"a": 1}'])
def test_a_json_text_that_is_not_a_string_is_an_error_at_its_line(tmp_path: Path, value: str) -> None:
    path = write_utf8(tmp_path / "t.jsonl", '{"text": "fine"}\n{"text": ' + value + "}\n")
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: 'text' must be a string"):
        read_texts(path)


def test_a_text_pair_column_is_read_as_pairs(tmp_path: Path) -> None:
    rows = read_texts(write_utf8(tmp_path / "p.jsonl", '{"text": "a", "text_pair": "b"}\n{"text": "c"}\n'))
    assert [(r.text, r.text_pair) for r in rows] == [("a", "b"), ("c", None)]
    named = read_texts(write_utf8(tmp_path / "p.csv", "q,h\na,b\n"), "q", "h")
    assert [(r.text, r.text_pair) for r in named] == [("a", "b")]
    with pytest.raises(ValueError, match=r"line 1: 'text_pair' must be a string"):
        read_texts(write_utf8(tmp_path / "n.jsonl", '{"text": "a", "text_pair": null}\n'))
    with pytest.raises(ValueError, match="no column 'h'"):
        read_texts(write_utf8(tmp_path / "q.csv", "text\na\n"), "text", "h")


PAIR_KEY_MISSING = [
    pytest.param(
        "p.jsonl", '{"text": "a", "h": "b"}\n{"text": "c"}\n', r"p.jsonl, line 2: expected .* key 'h'", id="line"
    ),
    pytest.param("p.jsonl", '{"text": "a"}\n\n{"text": "c"}\n', r"p.jsonl, line 1: expected .* key 'h'", id="none-has"),
    pytest.param(
        "p.json", '[{"text": "a", "h": "b"}, {"text": "c"}]', r"p.json, record 2: expected .* key 'h'", id="array"
    ),
    pytest.param("p.csv", "text,x\na,b\n", r"p.csv: no column 'h'; the columns are \['text', 'x'\]", id="csv"),
]


@pytest.mark.parametrize(("name", "content", "message"), PAIR_KEY_MISSING)
def test_a_pair_column_asked_for_must_be_in_every_record_as_the_text_column_must(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = write_utf8(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        read_texts(path, "text", "h")


def test_a_parquet_file_without_the_pair_column_asked_for_is_refused_before_reading(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "h": ["x", "y"]}), path)
    assert [(t.text, t.text_pair) for t in read_texts(path, "text", "h")] == [("a", "x"), ("b", "y")]
    with pytest.raises(ValueError, match=r"t.parquet: no column 'nothere'; the columns are \['text', 'h'\]"):
        open_texts(path, "text", "nothere")


def test_an_empty_pair_asked_for_makes_a_single_text_and_a_blank_line_needs_no_key(tmp_path: Path) -> None:
    path = write_utf8(tmp_path / "p.jsonl", '{"text": "a", "h": ""}\n\n{"text": "c", "h": "d"}\n')
    assert [(t.text, t.text_pair) for t in read_texts(path, "text", "h")] == [("a", None), ("", None), ("c", "d")]


def test_lone_surrogates_are_found_and_surrogate_pairs_are_text() -> None:
    assert lone_surrogate("bad \ud800") == "U+D800" and lone_surrogate("x\udfff y") == "U+DFFF"
    assert lone_surrogate(json.loads('"\\ud83d\\ude00"')) is None and lone_surrogate("plain") is None


def test_a_lone_surrogate_in_a_labelled_file_is_an_error_at_its_line(tmp_path: Path) -> None:
    rows = [{"text": "fine", "label": "x"}, {"text": "also fine", "label": "y"}, {"text": "a \ud800", "label": "x"}]
    path = write_utf8(tmp_path / "d.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"d.jsonl, line 3: 'text' holds a lone surrogate \(U\+D800\)"):
        load_file(path)


def test_missing_files_and_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing.txt: no such file"):
        read_texts(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="is a directory"):
        read_texts(tmp_path)


# load_file


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    path.write_text("\n".join(delimiter.join(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_load_file_maps_string_labels_in_sorted_order_and_splits_stratified(tmp_path: Path) -> None:
    rows = [["text", "label"]] + [[f"review {i}", ["pos", "neg", "neutral"][i % 3]] for i in range(60)]
    dataset = load_file(write_csv(tmp_path / "reviews.csv", rows))
    assert dataset.name == "reviews"
    assert dataset.labels == ["neg", "neutral", "pos"]
    assert split_sizes(dataset) == (48, 6, 6)
    for split in SPLITS:
        assert label_counts(dataset.split(split)) == [len(dataset.split(split)) // 3] * 3
    everything = {(e.text, e.label) for split in SPLITS for e in dataset.split(split)}
    assert everything == {(f"review {i}", [2, 0, 1][i % 3]) for i in range(60)}


def test_load_file_split_is_seeded_and_fractions_set_the_sizes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["text", "label"]] + [[f"t{i}", str(i % 2)] for i in range(100)])
    assert load_file(path, seed=3) == load_file(path, seed=3)
    assert load_file(path, seed=3).train != load_file(path, seed=4).train
    assert split_sizes(load_file(path, dev_fraction=0.2, test_fraction=0.3)) == (50, 20, 30)
    assert split_sizes(load_file(path, dev_fraction=0.0)) == (90, 0, 10)


def test_load_file_reads_jsonl_text_pairs_and_keeps_integer_labels_0_to_n(tmp_path: Path) -> None:
    path = tmp_path / "nli.jsonl"
    records = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(30)]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    dataset = load_file(path, text_column="premise", text_pair_column="hypothesis")
    assert dataset.labels == ["0", "1", "2"]
    examples = {e.text: e for split in SPLITS for e in dataset.split(split)}
    assert len(examples) == 30
    assert examples["p7"] == TextExample("p7", 1, "h7")


def test_load_file_orders_integer_labels_numerically(tmp_path: Path) -> None:
    rows = [["text", "stars"]] + [[f"t{i}", str(stars)] for i, stars in enumerate([10, 9, 2, 10, 9, 2] * 5)]
    dataset = load_file(write_csv(tmp_path / "stars.csv", rows), label_column="stars")
    assert dataset.labels == ["2", "9", "10"]
    examples = {e.text: e.label for split in SPLITS for e in dataset.split(split)}
    assert (examples["t0"], examples["t1"], examples["t2"]) == (2, 1, 0)


def test_load_file_uses_a_split_column_keeping_file_order(tmp_path: Path) -> None:
    rows = [
        ["label", "text", "split"],
        ["b", "one", "train"],
        ["a", "two", "test"],
        ["a", "three", "train"],
        ["b", "four", "Validation"],
        ["a", "five", "dev"],
    ]
    dataset = load_file(write_csv(tmp_path / "fixed.csv", rows), dev_fraction=0.5)
    assert dataset.train == [TextExample("one", 1), TextExample("three", 0)]
    assert dataset.dev == [TextExample("four", 1), TextExample("five", 0)]
    assert dataset.test == [TextExample("two", 0)]


def test_load_file_reads_tsv_quoted_csv_and_a_json_array(tmp_path: Path) -> None:
    tsv = write_csv(tmp_path / "d.tsv", [["text", "label", "split"], ["a, b", "x", "train"], ["c", "y", "dev"]], "\t")
    assert load_file(tsv).train == [TextExample("a, b", 0)]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('\ufefftext,label,split\n"say ""hi"",\nthen go",x,train\nc,y,test\n', encoding="utf-8")
    assert load_file(csv_path).train == [TextExample('say "hi",\nthen go', 0)]
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "y"}]))
    with pytest.raises(ValueError, match=r"d.json, record 2: no 'split'"):
        load_file(array)


BAD_FILES = [
    pytest.param("d.txt", "text,label\na,b\n", {}, r"unsupported file type '.txt'", id="extension"),
    pytest.param("d.csv", "", {}, r"d.csv is empty", id="empty"),
    pytest.param("d.jsonl", "\n \n", {}, r"d.jsonl is empty", id="blank"),
    pytest.param("d.csv", "text,label\n", {}, r"d.csv has no examples", id="header-only"),
    pytest.param(
        "d.csv", "body,label\na,x\nb,y\n", {}, r"no column 'text'; the columns are \['body', 'label'\]", id="text"
    ),
    pytest.param("d.csv", "text,label\na,x\nb,y\n", {"text_pair_column": "b"}, r"no column 'b'", id="pair-column"),
    pytest.param("d.csv", "text,label\na,x\nb,y,z\n", {}, r"line 3: 3 fields where the header has 2", id="fields"),
    pytest.param("d.csv", 'text,label\n"a,x\n', {}, r"line \d+: malformed CSV", id="quote"),
    pytest.param("d.csv", "text,label\na,x\n ,y\n", {}, r"line 3: 'text' must be a non-empty string", id="empty-text"),
    pytest.param("d.csv", "text,label\na,x\nb,\n", {}, r"line 3: empty label", id="empty-label"),
    pytest.param("d.csv", "text,label\na,pos\nb,pos\n", {}, r"at least two labels, found only 'pos'", id="one-label"),
    pytest.param("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", \n', {}, r"line 2: invalid JSON", id="json"),
    pytest.param("d.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', {}, r"line 2: expected a JSON object", id="array"),
    pytest.param("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', {}, r"line 2: no 'label'", id="key"),
    pytest.param(
        "d.jsonl", '{"text": "a", "label": 0.5}\n', {}, r"line 1: a label must be a string or an int", id="float"
    ),
    pytest.param(
        "d.jsonl", '{"text": 3, "label": 0}\n', {}, r"line 1: 'text' must be a non-empty string", id="int-text"
    ),
    pytest.param(
        "d.csv", "text,label,split\na,x,train\nb,y,holdout\n", {}, r"split 'holdout' is not one of", id="split"
    ),
    pytest.param(
        "d.csv", "text,label,split\na,x,dev\nb,y,test\n", {}, r"'split' column puts no rows in train", id="no-train"
    ),
    pytest.param("d.csv", "text,label\na,x\nb,y\nc,x\n", {}, r"3 examples leave dev empty", id="too-few"),
    pytest.param(
        "d.csv", "text,label\na,x\nb,y\n", {"dev_fraction": 0.5, "test_fraction": 0.5}, r"sum below 1", id="fractions"
    ),
]


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), BAD_FILES)
def test_load_file_refuses_bad_input_naming_the_problem(
    tmp_path: Path, name: str, content: str, kwargs: dict, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_file(path, **kwargs)


def test_load_file_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\n£5,x\nb,y\n".encode("latin-1"))
    with pytest.raises(ValueError, match="d.csv is not UTF-8 text"):
        load_file(path)


# Texts are read lazily, in bounded memory (streaming ``mp predict``)


def test_texts_are_read_lazily_records_before_a_bad_one_come_first(tmp_path: Path) -> None:
    path = write_utf8(tmp_path / "t.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": 3}\n')
    texts = iter(open_texts(path))
    assert [next(texts).text for _ in range(3)] == ["a", "", "b"]
    with pytest.raises(ValueError, match=r"t.jsonl, line 4: 'text' must be a string"):
        next(texts)
    assert [t.text for t in open_texts(write_utf8(tmp_path / "c.csv", 'text\na\n"b\nc"\n'))] == ["a", "b\nc"]


def test_a_file_of_blank_records_raises_before_giving_any(tmp_path: Path) -> None:
    texts = iter(open_texts(write_utf8(tmp_path / "t.txt", "\n  \n\n")))
    with pytest.raises(ValueError, match="holds no text"):
        next(texts)


def test_open_texts_knows_before_reading_whether_the_file_holds_pairs(tmp_path: Path) -> None:
    late = write_utf8(tmp_path / "p.jsonl", '{"text": "a"}\n' * 50 + '{"text": "b", "text_pair": "c"}\n')
    assert open_texts(late).pairs and list(open_texts(late))[-1].text_pair == "c"
    mention = write_utf8(tmp_path / "m.jsonl", '{"text": "about text_pair"}\n')
    assert not open_texts(mention).pairs
    assert open_texts(write_utf8(tmp_path / "p.csv", "text,text_pair\na,b\n")).pairs


def test_a_parquet_file_is_read_like_a_json_lines_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a", " ", "été"]}), path)
    assert [(t.index, t.line, t.text) for t in read_texts(path)] == [(0, None, "a"), (1, None, ""), (2, None, "été")]
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(ValueError, match=r"t.parquet, record 2: 'text' must be a string"):
        read_texts(path)
