"""Specification of the ``mp`` command: help texts, train/eval/predict on a tiny run, quickstart pass-through."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest

from mp_model.cli import COMMANDS, build_parser, main
from mp_model.evaluation import METHODS
from mp_model.training import FINAL_DIR, STATE_FILE, TrainConfig
from tests.test_training import write_tiny_model, write_toy_dataset

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
    fake = types.ModuleType("bench.quickstart")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "bench.quickstart", fake)
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
    code, _ = run_main(["predict", str(source), "--run-dir", str(tmp_path / "missing")], capsys)
    assert isinstance(code, str) and FINAL_DIR in code and "mp train" in code
