"""The end-to-end benchmark runs through at toy size and its results feed the figures and the README tables.

A tiny random BERT (2 layers, width 32) saved with the MiniLM tokenizer stands in for the real model, so that the
benchmark, plots and tables run in well under a minute on a CPU.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import e2e
from mp_model.recipe import plots
from tests.utils import read_results

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES_SUM_TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("cpu_user_settings")


def test_e2e_benchmark_writes_every_cell_with_consistent_numbers(toy_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    argv = ["--model", str(toy_model), "--models", "minilm", "--batch-sizes", "1,4", "--buckets", "short,mixed"]
    argv += ["--repeats", "2", "--rotate-examples", "4", "--quiet", "--out", str(out)]
    assert e2e.main(argv) == 0
    payload = read_results(out)
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
        prunes, exits = e2e.PACKED_METHODS[r["method"]]
        assert (r["mean_exit_layer"] < 2) == exits
        assert (r["flops_speedup"] > 1.0) == (prunes or exits)
        if r["batch_size"] == 1 and meta["models"]["minilm"]["packed_engine"] == "ort":
            # A lone sequence runs in ONNX Runtime sessions, which the profiler sees as one range.
            assert r["stages_ms"]["onnx_runtime"] > 0 and r["ranges_ms"]["feed_forward"] == 0
            continue
        assert r["ranges_ms"]["feed_forward"] > 0
        if prunes:
            assert r["stages_ms"]["compaction"] > 0
        if not (prunes or exits):  # with exits only, nothing is compacted when no example or every one leaves
            assert r["stages_ms"]["compaction"] == 0
        assert (r["stages_ms"]["exit"] > 0) == exits

    figures = plots.make_plots([out], tmp_path / "plots")
    assert [p.name for p in figures] == ["bucket_speedup.png", "measured_vs_flops.png"]

    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- summary:begin -->\n<!-- summary:end -->\n<!-- results:begin -->\nold\n<!-- results:end -->\nrest\n"
    )
    script = REPO_ROOT / "scripts" / "results_tables.py"
    command = [sys.executable, str(script), "--results", str(tmp_path), "--update", str(readme)]
    subprocess.run(command, check=True, capture_output=True)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- summary:begin -->\nNo evaluation files under") and text.endswith("rest\n")
    assert "<!-- results:begin -->\n#### End to end" in text
    assert "old" not in text and "| minilm | mixed | 4 |" in text
