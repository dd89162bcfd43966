"""Specification of ``bench.selection_study``: each rule's dev choice read on test beside the best setting read on
test itself, the aggregates per rule, the per-run outcome cache that a changed run never reuses, and the command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.selection_study import CACHE_FILE, main, run_outcomes, study_run, summarise
from mp_model.recipe.runs import DENSE_DIR, FINAL_DIR, sha256
from mp_model.recipe.selection import outcome_record, select
from mp_model.recipe.selection_rules import candidate_rules
from tests.utils import read_results, write_tiny_model, write_toy_dataset

TAUS = (0.3, 0.6)
SCALES = (1.0, 2.0)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared machine threads contend: one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_run(root: Path) -> Path:
    """A finished run in the recipe's layout: two tiny random models as stage 1 and stage 4 over a toy dataset."""
    run = root / "run"
    run.mkdir(parents=True)
    write_toy_dataset(root / "toy.csv", count=120)
    write_tiny_model(run / DENSE_DIR, seed=0)
    write_tiny_model(run / FINAL_DIR, seed=1)
    (run / "state.json").write_text(json.dumps({"stages_done": [1, 2, 3, 4]}))
    (run / "train_config.json").write_text(json.dumps({"dataset": str(root / "toy.csv"), "max_length": 48}))
    return run


def outcomes(run: Path, taus: tuple[float, ...] = TAUS) -> tuple[dict, dict]:
    return run_outcomes(run, size=None, taus=taus, scales=SCALES, batch_size=16, device="cpu")


def test_the_outcome_cache_is_reused_only_for_the_same_run_split_and_sweep(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    first, facts = outcomes(run)
    assert not facts["outcomes_cached"] and (run / CACHE_FILE).is_file()
    assert facts["settings"] == 1 + len(SCALES) + len(TAUS) + len(TAUS) * len(SCALES)
    again, facts = outcomes(run)
    assert facts["outcomes_cached"]
    assert [r["accuracy"] for r in again["test"]] == [r["accuracy"] for r in first["test"]]
    assert not outcomes(run, taus=(0.3,))[1]["outcomes_cached"], "another sweep"
    write_tiny_model(run / FINAL_DIR, seed=2)
    assert not outcomes(run)[1]["outcomes_cached"], "another final model"
    models = torch.load(run / CACHE_FILE, weights_only=True)["fingerprint"]["models"]
    weights = f"{FINAL_DIR}/model.safetensors"
    assert models[weights] == sha256(run / weights), "the cache now holds the new model's outcomes"
    (run / CACHE_FILE).write_bytes(b"not a torch file")
    assert not outcomes(run)[1]["outcomes_cached"]


def records_of(split: dict[tuple, list[bool]], gflops: dict[tuple, float]) -> list[dict]:
    """One record per setting of ``split`` (its per-example correctness), each example costing its ``gflops``."""
    return [
        outcome_record("d", key, torch.tensor(correct), torch.full((len(correct),), gflops[key] * 1e9))
        for key, correct in split.items()
    ]


def test_each_choice_is_read_on_test_beside_the_methods_best_setting_within_the_limit_there() -> None:
    right, wrong = [True] * 100, [True] * 97 + [False] * 3
    keys = [("dense", None, None), ("ltp", None, 1.0), ("fastbert", 0.5, None), ("mp", 0.5, 1.0), ("mp", 0.9, 1.0)]
    gflops = dict(zip(keys, (8.0, 4.0, 2.0, 2.0, 1.0), strict=True))
    dev = records_of(dict(zip(keys, (right, right, right, wrong, right), strict=True)), gflops)
    test = records_of(dict(zip(keys, (right, right, wrong, right, wrong), strict=True)), gflops)
    rules = {"point": lambda records, seed: select(records, 0.01)}
    rows = {r["method"]: r for r in study_run({"dev": dev, "test": test}, rules, max_drop=0.01, splits=4, seed=0)}
    mp = rows["mp"]
    assert (mp["tau"], mp["threshold_scale"]) == (0.9, 1.0), "on dev the cheapest MP setting is within the limit"
    assert mp["test_flops_speedup"] == pytest.approx(8.0) and mp["test_drop"] == pytest.approx(0.03)
    assert not mp["within_limit"]
    assert (mp["oracle_tau"], mp["oracle_flops_speedup"]) == (0.5, pytest.approx(4.0))
    assert mp["ratio"] == pytest.approx(2.0)
    assert rows["fastbert"]["oracle_flops_speedup"] is None and rows["fastbert"]["ratio"] is None
    assert rows["ltp"]["ratio"] == pytest.approx(1.0) and rows["ltp"]["within_limit"]
    assert set(mp["reliability"]) == {"within_limit", "median_drop", "median_flops_speedup"}


def test_the_summary_counts_runs_within_the_limit_and_mp_ahead_and_judges_the_target() -> None:
    def row(run: str, method: str, speedup: float, ratio: float, within: bool) -> dict:
        measured = {"test_flops_speedup": speedup, "ratio": ratio, "oracle_flops_speedup": speedup / ratio}
        return {"run_dir": run, "rule": "r", "method": method, "within_limit": within, **measured} | {
            "reliability": {"within_limit": 0.9}
        }

    rows = [row("a", "mp", 3.0, 0.9, True), row("a", "ltp", 1.5, 1.0, True), row("a", "fastbert", 2.0, 1.0, True)]
    rows += [row("b", "mp", 2.0, 0.8, False), row("b", "ltp", 1.5, 1.0, True), row("b", "fastbert", 2.5, 1.0, True)]
    rows += [row("c", "mp", 4.0, 0.7, True), row("c", "ltp", 1.0, 1.0, True), row("c", "fastbert", 3.0, 1.0, True)]
    mp = summarise(rows, ["r"])["r"]["mp"]
    assert mp["mean_ratio"] == pytest.approx(0.8) and mp["mean_flops_speedup"] == pytest.approx(3.0)
    assert (mp["runs"], mp["within_limit_on_test"], mp["ahead_of_ltp_and_fastbert"]) == (3, 2, 2)
    assert mp["meets_target"], "a mean ratio of 0.8 and 2 of 3 runs within the limit"
    rows[0] = row("a", "mp", 3.0, 0.8, True)
    assert not summarise(rows, ["r"])["r"]["mp"]["meets_target"]


def test_the_study_reports_every_rule_and_method_of_every_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "study.json"
    argv = ["--run-dir", str(run), "--out", str(out), "--splits", "3", "--resamples", "40"]
    assert main([*argv, "--taus", *map(str, TAUS), "--scales", *map(str, SCALES)]) == 0
    printed = capsys.readouterr().out
    payload = read_results(out)
    rules = list(candidate_rules())
    assert payload["provenance"]["rules"] == rules
    assert [(r["rule"], r["method"]) for r in payload["records"]] == [
        (n, m) for n in rules for m in ("ltp", "fastbert", "mp")
    ]
    for record in payload["records"]:
        assert record["within_limit"] == (record["test_drop"] <= 0.01 + 1e-9)
        if record["oracle_flops_speedup"] is not None:
            assert record["ratio"] == pytest.approx(record["test_flops_speedup"] / record["oracle_flops_speedup"])
            assert not record["within_limit"] or record["ratio"] <= 1 + 1e-9, "the oracle is the best within the limit"
    assert set(payload["provenance"]["summary"]) == set(rules)
    assert all(name in printed for name in rules)
    (facts,) = payload["provenance"]["runs"]
    assert facts["examples"]["dev"] > 0 and not facts["outcomes_cached"]


def test_the_command_fails_in_one_line_naming_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--run-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err
    assert main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "x.json"), "--splits", "0"]) == 2
    assert "--splits" in capsys.readouterr().err
