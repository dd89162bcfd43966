"""Specification of bench.gpu_training: each dataset's chain of commands, and a chain stopping at its first failed
step while the other chains go on (the CPU smoke run itself takes minutes; the plumbing is checked here on stand-in
commands)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import gpu_training


def options(command: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` in ``command``."""
    return [command[i + 1] for i, word in enumerate(command[:-1]) if word == flag]


def test_the_full_chains_train_on_every_example_on_cuda_and_evaluate_without_timing(tmp_path: Path) -> None:
    args = gpu_training.parse_args(["--out", str(tmp_path)])
    chains = {dataset: dict(gpu_training.chain(dataset, args)) for dataset in args.datasets}
    assert set(chains) == {"rotten_tomatoes", "bbc_news"}
    for steps in chains.values():
        assert list(steps) == ["train", "reference", "eval", "predict"]
        assert options(steps["train"], "--device") == options(steps["eval"], "--device") == ["cuda"]
        assert options(steps["predict"], "--device") == ["cuda"], "mp predict on the GPU too (#38)"
        assert "--train-size" not in steps["train"], "every training example"
        assert options(steps["eval"], "--latency") == ["none"]
        run_dir = options(steps["train"], "--run-dir")
        assert run_dir == options(steps["reference"], "--run-dir") == options(steps["eval"], "--run-dir")
        assert run_dir == options(steps["predict"], "--run-dir")
    assert options(chains["bbc_news"]["train"], "--max-length") == ["512"]
    assert options(chains["rotten_tomatoes"]["train"], "--dev-from-train") == ["2000"]
    assert options(chains["bbc_news"]["eval"], "--json") == [str(tmp_path / "bbc_news-all-cuda.json")]


def test_extra_options_come_last_so_that_they_win(tmp_path: Path) -> None:
    args = gpu_training.parse_args(["--out", str(tmp_path), "--toy", "--train-args", "--max-length 32 --seed 3"])
    train = dict(gpu_training.chain("bbc_news", args))["train"]
    assert options(train, "--max-length")[-1] == "32" and train[-2:] == ["--seed", "3"]
    assert "--train-size" in train, "--toy sizes"


def test_a_chain_stops_at_its_first_failure_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def chain(dataset: str, args: object) -> list[tuple[str, list[str]]]:
        code = "raise SystemExit(3)" if dataset == "bbc_news" else "print('fine')"
        return [(step, [sys.executable, "-c", code]) for step in ("train", "reference", "eval", "predict")]

    monkeypatch.setattr(gpu_training, "chain", chain)
    assert gpu_training.main(["--out", str(tmp_path), "--device", "cpu"]) == 1
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [steps[f"rotten_tomatoes-{s}"]["status"] for s in ("train", "reference", "eval", "predict")] == ["ok"] * 4
    assert steps["bbc_news-train"]["status"] == "failed" and steps["bbc_news-train"]["returncode"] == 3
    assert "bbc_news-reference" not in steps and "bbc_news-eval" not in steps
    assert (tmp_path / "rotten_tomatoes-eval.log").read_text().strip().endswith("fine")


def test_the_predict_step_reads_the_test_texts_written_before_the_chains(tmp_path: Path) -> None:
    args = gpu_training.parse_args(["--out", str(tmp_path), "--datasets", "rotten_tomatoes"])
    path = gpu_training.write_texts("rotten_tomatoes", args)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == gpu_training.PREDICT_TEXTS and all(row["text"] for row in rows)
    predict = dict(gpu_training.chain("rotten_tomatoes", args))["predict"]
    assert predict[predict.index("predict") + 1] == str(path)


def test_unknown_datasets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        gpu_training.parse_args(["--out", str(tmp_path), "--datasets", "imdb"])
