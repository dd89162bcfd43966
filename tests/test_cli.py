"""Specification of the ``mp`` command: help texts, train/eval/predict on a tiny run, quickstart pass-through, and
its reliability: one output row per input record, every error one line naming the argument or file, before any
work."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mp_model.recipe import quickstart
from mp_model.recipe.cli import COMMANDS, build_parser, main, train_config_from_args
from mp_model.recipe.evaluation import METHODS
from mp_model.recipe.runs import FINAL_DIR, STATE_FILE
from mp_model.recipe.selection import ROUNDING
from mp_model.recipe.train_config import TrainConfig
from tests.utils import write_tiny_model, write_toy_dataset

RECORD_KEYS = {
    "dataset",
    "split",
    "method",
    "tau",
    "threshold_scale",
    "accuracy",
    "gflops",
    "flops_speedup",
    "latency_ms",
    "latency_speedup",
    "device",
    "buckets",
    "selected",
}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(argv)``'s exit code (from a return or SystemExit) and its standard output."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["--help"], capsys)
    assert code == 0
    for name in ("train", "eval", "predict", "quickstart"):
        assert name in out


def test_train_help_explains_every_config_field(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["train", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in flat
        assert " ".join(field.metadata["help"].split()[:3]) in flat, field.name
    assert "--stage" in flat


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_subcommand_help_describes_each_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main([command, "--help"], capsys)
    assert code == 0
    for flag in ("--run-dir", "--device", "--batch-size"):
        assert flag in out
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in subparsers.choices[command]._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 8
    for action in actions:
        assert action.help and len(action.help) > 10, action.dest
        assert (action.option_strings or [action.dest])[0] in out


def test_quickstart_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(quickstart, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["quickstart", "--help", "--steps", "3"]) == 0
    assert seen == [["--help", "--steps", "3"]]
    assert COMMANDS["quickstart"].passthrough


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run made through ``mp train``."""
    root = tmp_path_factory.mktemp("cli")
    write_tiny_model(root / "base")
    write_toy_dataset(root / "toy.csv")
    run = root / "run"
    argv = [
        "train",
        *("--model", str(root / "base"), "--dataset", str(root / "toy.csv"), "--run-dir", str(run)),
        *("--train-size", "all", "--dev-size", "all", "--batch-size", "8", "--max-length", "48"),
        *("--lr", "3e-3", "--exit-lr", "1e-2", "--epochs-finetune", "4", "--epochs-soft", "1"),
        *("--epochs-hard", "1", "--epochs-exits", "2", "--final-thresholds", "1.0", "--lambdas", "0.5"),
        *("--search-epochs-soft", "0.5", "--search-epochs-hard", "0.5", "--no-progress"),
    ]
    assert main(argv) == 0
    return run


def test_train_writes_a_finished_run_and_resumes_from_the_run_dir_alone(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert json.loads((run_dir / STATE_FILE).read_text())["stages_done"] == [1, 2, 3, 4]
    code, out = run_main(["train", "--run-dir", str(run_dir), "--no-progress"], capsys)
    assert code == 0
    assert "stage 4" in out


def test_train_sets_torch_threads_when_asked(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, _ = run_main(["train", "--run-dir", str(run_dir), "--threads", "1", "--no-progress"], capsys)
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_train_reports_a_configuration_clash(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--run-dir", str(run_dir), "--lr", "0.5", "--no-progress"]) == 2
    assert "lr differ" in capsys.readouterr().err


def test_eval_json_holds_one_well_formed_record_per_setting(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "results.json"
    argv = [
        *("eval", "--run-dir", str(run_dir), "--json", str(out_file), "--taus", "0.1", "0.5"),
        *("--scales", "1.0", "2.0", "--latency-examples", "8", "--latency-repeats", "1", "--batch-size", "4"),
    ]
    code, out = run_main(argv, capsys)
    assert code == 0
    assert "method" in out
    payload = json.loads(out_file.read_text())
    assert {"device", "torch", "git_commit", "command", "run_dir"} <= set(payload["provenance"])
    records = payload["records"]
    keys = [(r["method"], r["tau"], r["threshold_scale"]) for r in records]
    assert len(keys) == len(set(keys)) == 1 + 2 + 2 + 4
    dense = next(r for r in records if r["method"] == "dense")
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert record["split"] == "test" and 0.0 <= record["accuracy"] <= 1.0
        assert record["flops_speedup"] == pytest.approx(dense["gflops"] / record["gflops"])
        assert sum(bucket["examples"] for bucket in record["buckets"].values()) == record["examples"]
    chosen_mp_scale = next(r["threshold_scale"] for r in records if r["selected"] and r["method"] == "mp")
    for record in records:
        in_tables = (
            record["selected"]
            or record["method"] == "fastbert"
            or (record["method"] == "mp" and record["threshold_scale"] == chosen_mp_scale)
        )
        if in_tables:
            assert record["latency_ms"] > 0 and record["latency_speedup"] > 0
        else:
            assert record["latency_ms"] is None
    assert sorted(r["method"] for r in records if r["selected"]) == sorted(METHODS)
    assert dense["flops_speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("flags", "qualifies"),
    [
        ([], lambda r: r["drop_bound"] <= 0.01 + ROUNDING),  # the default rule: normal:1
        (["--rule", "bootstrap:0.8"], lambda r: r["within_limit_share"] >= 0.8),
        (["--confidence", "none"], lambda r: r["dev_drop"] <= 0.01 + ROUNDING),
    ],
)
def test_eval_json_lets_each_choice_be_checked_from_the_dev_numbers_of_every_setting(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    qualifies: Callable[[dict], bool],
) -> None:
    out_file = tmp_path / "results.json"
    argv = [
        *("eval", "--run-dir", str(run_dir), "--json", str(out_file), "--taus", "0.1", "0.5", "0.9"),
        *("--scales", "1.0", "2.0", "--latency", "none", "--batch-size", "4", "--reliability-splits", "0", *flags),
    ]
    code, out = run_main(argv, capsys)
    assert code == 0
    records = json.loads(out_file.read_text())["records"]
    dense_dev = next(r["dev_accuracy"] for r in records if r["method"] == "dense")
    for record in records:
        assert record["selected_on"] == "dev" and 0.0 <= record["dev_accuracy"] <= 1.0 and record["dev_gflops"] > 0
        record["dev_drop"] = dense_dev - record["dev_accuracy"]
    for method in ("dense", *METHODS):
        rows = [r for r in records if r["method"] == method]
        eligible = [r for r in rows if qualifies(r)]
        if eligible:
            expected = min(eligible, key=lambda r: (r["dev_gflops"], -r["dev_accuracy"]))
        else:
            expected = max(rows, key=lambda r: (r["dev_accuracy"], -r["dev_gflops"]))
        assert [r for r in rows if r["selected"]] == [expected]
        assert expected["met_rule"] is bool(eligible), "a choice no setting qualified for is marked as such"
        assert all("met_rule" not in r for r in rows if not r["selected"])
    missed = [m for m in METHODS if not next(r for r in records if r["selected"] and r["method"] == m)["met_rule"]]
    assert (f"no setting of {', '.join(missed)} met the rule on dev" in out) is bool(missed)


def test_eval_refuses_a_bad_rule_in_one_line_before_any_work(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, message in (
        (["--rule", "normal"], "--rule: rule must be one of normal:K, bootstrap:C"),
        (["--rule", "bootstrap:1.5"], "--rule: rule's C must be a finite number"),
        (["--confidence", "nan"], "--confidence: rule's C must be a finite number"),
        (["--rule", "point", "--confidence", "0.8"], "give --rule or --confidence, not both"),
    ):
        code = main(["eval", "--run-dir", str(run_dir), *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_reference_is_a_plain_fine_tune_that_eval_reports_beside_the_selection(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import BertForSequenceClassification

    from mp_model.recipe.data import encode
    from mp_model.recipe.reference import REFERENCE_DIR, REFERENCE_FILE, accuracy
    from mp_model.recipe.training import load_data

    code, out = run_main(["reference", "--run-dir", str(run_dir), "--lrs", "3e-3", "1e-3", "--no-progress"], capsys)
    assert code == 0, out
    saved = json.loads((run_dir / REFERENCE_FILE).read_text())
    config = TrainConfig.from_dict(json.loads((run_dir / "train_config.json").read_text()))
    assert [(p["lr"], p["epoch"]) for p in saved["grid"]] == [(lr, e) for lr in (3e-3, 1e-3) for e in range(1, 5)]
    assert saved["dev_accuracy"] == max(p["dev_accuracy"] for p in saved["grid"])
    assert saved["arithmetic"] == config.arithmetic
    model = BertForSequenceClassification.from_pretrained(run_dir / REFERENCE_DIR)
    assert type(model) is BertForSequenceClassification
    dev = load_data(config).dev
    assert accuracy(model, dev, batch_size=4, device="cpu") == pytest.approx(saved["dev_accuracy"])

    out_file = tmp_path / "eval.json"
    argv = ["eval", "--run-dir", str(run_dir), "--latency", "none", "--json", str(out_file), "--taus", "0.5"]
    code, out = run_main([*argv, "--scales", "1.0", "--reliability-splits", "5"], capsys)
    assert code == 0
    assert "plain fine-tune (transformers.BertForSequenceClassification" in out
    assert "point estimate rule, 5 re-splits" in out and "normal k=1 rule, 5 re-splits" in out
    meta = json.loads(out_file.read_text())["provenance"]
    assert meta["training_arithmetic"] == {f"stage{n}": config.arithmetic for n in (1, 2, 3, 4)}
    test = encode(load_data(config).tokenizer, load_data(config).dataset.test, config.max_length)
    assert meta["reference"]["accuracy"] == pytest.approx(accuracy(model, test, batch_size=4, device="cpu"))
    reliability = meta["selection_details"]["reliability"]
    assert set(reliability) == {"point estimate", "normal k=1"}
    for methods in reliability.values():
        assert set(methods) == {"ltp", "fastbert", "mp"}
        assert all(0.0 <= m["within_limit"] <= 1.0 for m in methods.values())

    original = (run_dir / REFERENCE_FILE).read_text()
    later_stages = {
        "lambdas": [9.0],
        "epochs_exits": 1.0,
        "exit_label_weight": 0.5,
        "prune_teacher_weight": 0.0,
        "precision": "bf16",
    }
    for changes, warned in (({"lr": 1.0, "seed": 3} | later_stages, True), (later_stages, False)):
        (run_dir / REFERENCE_FILE).write_text(json.dumps(saved | {"train_config": config.to_dict() | changes}))
        main([*argv, "--scales", "1.0", "--reliability-splits", "0"])
        err = capsys.readouterr().err
        assert ("reference was trained with another stage-1 configuration (seed, lr)" in err) is warned, err
    (run_dir / REFERENCE_FILE).write_text(original)


def test_a_dev_split_carved_from_train_is_used_by_training_and_by_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mp_model.recipe.training import load_data

    write_tiny_model(tmp_path / "base")
    write_toy_dataset(tmp_path / "toy.csv")
    run = tmp_path / "run"
    argv = [
        "train",
        *("--model", str(tmp_path / "base"), "--dataset", str(tmp_path / "toy.csv"), "--run-dir", str(run)),
        *("--dev-from-train", "12", "--batch-size", "8", "--max-length", "48", "--epochs-finetune", "1"),
        *("--epochs-soft", "0.5", "--epochs-hard", "0.5", "--epochs-exits", "1", "--final-thresholds", "1.0"),
        *("--lambdas", "0.5", "--search-epochs-soft", "0.25", "--search-epochs-hard", "0.25", "--no-progress"),
    ]
    assert main(argv) == 0
    config = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    plain = load_data(dataclasses.replace(config, dev_from_train=0))
    carved = load_data(config)
    assert len(carved.train["labels"]) == len(plain.train["labels"]) - 12
    assert len(carved.dev["labels"]) == len(plain.dev["labels"]) + 12
    out_file = tmp_path / "eval.json"
    eval_argv = ["eval", "--run-dir", str(run), "--latency", "none", "--reliability-splits", "0"]
    code, _ = run_main([*eval_argv, "--taus", "0.5", "--scales", "1.0", "--json", str(out_file)], capsys)
    assert code == 0
    selection = json.loads(out_file.read_text())["provenance"]["selection_details"]
    assert selection["examples"] == len(carved.dev["labels"])


def test_predict_labels_every_text_with_its_exit_layer(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["great superb lovely", "awful dull poor boring", "the movie was a film"]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    code, out = run_main(["predict", str(source), "--run-dir", str(run_dir), "--tau", "0.5"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["text"] for row in rows] == texts
    assert [row["label"] for row in rows[:2]] == ["1", "0"]
    assert all(1 <= row["exit_layer"] <= 3 and row["gflops"] > 0 for row in rows)

    table = tmp_path / "texts.csv"
    with table.open("w", newline="") as file:
        csv.writer(file).writerows([["id", "review"], *[[i, t] for i, t in enumerate(texts)]])
    target = tmp_path / "labels.csv"
    argv = ["predict", str(table), "--column", "review", "--output", str(target), "--run-dir", str(run_dir)]
    assert run_main(argv, capsys)[0] == 0
    with target.open() as file:
        written = list(csv.DictReader(file))
    assert [row["text"] for row in written] == texts
    assert {"label", "label_id", "exit_layer", "confidence"} <= set(written[0])


def test_predict_without_a_model_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("hello\n")
    code = main(["predict", str(source), "--run-dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert FINAL_DIR in err and "mp train" in err


# Reliability: one row per record, errors as one line before any work (issue 15)


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``main(argv)``'s stderr, checked to be one error line (exit code 2) without a traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    return err


def test_predict_gives_one_row_per_input_line_in_order_blank_lines_included(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["great superb lovely", "", "awful\u2028dull poor", "   ", "the movie\x0cwas a film"]
    source = tmp_path / "texts.txt"
    source.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    code, out = run_main(["predict", str(source), "--run-dir", str(run_dir)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(row["index"], row["line"]) for row in rows] == [(i, i + 1) for i in range(len(lines))]
    assert [row["text"] for row in rows] == [line if line.strip() else "" for line in lines]
    assert [row["label"] is None for row in rows] == [not line.strip() for line in lines]


def test_predict_encodes_a_text_pair_column_as_bert_pairs(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "pairs.jsonl"
    records = [{"text": "great superb", "text_pair": "awful dull"}, {"text": "great superb"}]
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    code, out = run_main(["predict", str(source), "--run-dir", str(run_dir), "--no-exit", "--no-prune"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["text_pair"] for row in rows] == ["awful dull", None]
    assert rows[0]["confidence"] != rows[1]["confidence"]


PREDICT_ERRORS = [
    pytest.param(["{missing}"], "missing.txt: no such file", id="missing-input"),
    pytest.param(["{tmp}"], "is a directory", id="directory-input"),
    pytest.param(["{input}", "--output", "{input}"], "is the input file", id="output-is-input"),
    pytest.param(["{input}", "--output", "{tmp}/no/out.jsonl"], "does not exist", id="output-folder-missing"),
    pytest.param(["{input}", "--output", "{tmp}"], "--output .* is a directory", id="output-directory"),
    pytest.param(["{input}", "--device", "gpu"], "device 'gpu'", id="unknown-device"),
    pytest.param(["{input}", "--max-length", "1"], "max_length must be >= 2", id="max-length-1"),
    pytest.param(["{input}", "--max-length", "1000"], "max_position_embeddings", id="max-length-too-long"),
    pytest.param(["{input}", "--tau", "nan"], "--tau must be a finite number", id="tau-nan"),
    pytest.param(["{input}", "--batch-size", "abc"], "invalid int value", id="argparse"),
    pytest.param(["{null}"], r"null.jsonl, line 2: 'text' must be a string, got NoneType", id="json-null"),
    pytest.param(["{quote}"], r"quote.csv, line 3: malformed CSV", id="csv-quote"),
    pytest.param(["{input}", "--checkpoint", "{tmp}/empty"], r"is not a saved model: no config.json", id="no-weights"),
]
if not torch.cuda.is_available():
    PREDICT_ERRORS.append(pytest.param(["{input}", "--device", "cuda"], "CUDA is not available", id="cuda"))


@pytest.mark.parametrize(("argv", "message"), PREDICT_ERRORS)
def test_predict_errors_are_one_line_naming_the_argument_or_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    paths = {"tmp": tmp_path, "missing": tmp_path / "missing.txt", "input": tmp_path / "in.txt"}
    paths |= {"null": tmp_path / "null.jsonl", "quote": tmp_path / "quote.csv"}
    paths["input"].write_text("fine text\n")
    paths["null"].write_text('{"text": "fine"}\n{"text": null}\n')
    paths["quote"].write_text('text\nfine\n"open\nmore\n')
    (tmp_path / "empty").mkdir()
    argv = ["predict", *[arg.format(**paths) for arg in argv], "--run-dir", str(run_dir)]
    assert re.search(message, run_error(argv, capsys))
    assert paths["input"].read_text() == "fine text\n"


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(tmp_path / "missing.txt"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_eval_refuses_a_dataset_whose_labels_the_model_does_not_know(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bbc.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{['business', 'tech'][i % 2]}\n" for i in range(40)))
    err = run_error(["eval", "--run-dir", str(run_dir), "--dataset", str(data), "--latency", "none"], capsys)
    assert "bbc.csv, line 2: label 'business' is not one of the model's labels ['0', '1']" in err


def test_eval_refuses_a_run_whose_stage_folder_is_gone(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    shutil.rmtree(broken / FINAL_DIR)
    assert "not a finished run" in run_error(["eval", "--run-dir", str(broken)], capsys)


@pytest.mark.parametrize(("flag", "value"), [("--lr", "-1"), ("--epochs-finetune", "-2"), ("--max-drop", "nan")])
def test_train_refuses_a_bad_flag_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    err = run_error(["train", "--run-dir", str(tmp_path / "run"), flag, value], capsys)
    assert flag[2:].replace("-", "_") in err
    assert not (tmp_path / "run").exists()


def test_train_takes_exit_scales_with_none_for_unpruned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "run")
    args = build_parser().parse_args(["train", "--run-dir", run, "--exit-scales", "none", "1", "2.5"])
    assert train_config_from_args(args).exit_scales == (None, 1.0, 2.5)
    for bad in ("0", "nan", "inf", "x"):
        err = run_error(["train", "--run-dir", run, "--exit-scales", "1", bad], capsys)
        assert f"--exit-scales: a threshold scale must be a positive number or 'none', got '{bad}'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval", "reference"])
@pytest.mark.parametrize("threads", ["0", "-3"])
def test_a_bad_thread_count_is_refused_naming_the_flag(
    run_dir: Path, capsys: pytest.CaptureFixture[str], command: str, threads: str
) -> None:
    state = (run_dir / STATE_FILE).read_text()
    err = run_error([command, "--run-dir", str(run_dir), "--threads", threads], capsys)
    assert f"--threads must be an integer >= 1, got {threads}" in err
    assert (run_dir / STATE_FILE).read_text() == state


def test_train_resumes_an_interrupted_first_stage_with_its_own_configuration(tmp_path: Path) -> None:
    from mp_model.recipe.runs import CHECKPOINT_FILE, PARTIAL_DIR

    run = tmp_path / "run"
    (run / PARTIAL_DIR).mkdir(parents=True)
    (run / PARTIAL_DIR / CHECKPOINT_FILE).write_bytes(b"checkpoint")
    (run / "train_config.json").write_text(json.dumps(TrainConfig(run_dir=str(run), seed=1, lr=3e-5).to_dict()))
    args = build_parser().parse_args(["train", "--run-dir", str(run)])
    assert train_config_from_args(args) == TrainConfig(run_dir=str(run), seed=1, lr=3e-5)
    args = build_parser().parse_args(["train", "--run-dir", str(run), "--epochs-exits", "5"])
    assert train_config_from_args(args) == TrainConfig(run_dir=str(run), seed=1, lr=3e-5, epochs_exits=5.0)


def test_a_failed_first_train_leaves_no_configuration_for_the_rerun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--dataset", str(tmp_path / "missing.csv"), "--lr", "0.5"]
    assert main([*argv, "--no-progress"]) == 2
    assert json.loads((run / "train_config.json").read_text())["lr"] == 0.5
    args = build_parser().parse_args(["train", "--run-dir", str(run), "--dataset", "bbc_news"])
    assert train_config_from_args(args) == TrainConfig(run_dir=str(run), dataset="bbc_news")
