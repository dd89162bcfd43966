"""Specification of ``mp quickstart`` (``mp_model.recipe.quickstart``): it trains, evaluates with ``mp eval``'s
latency protocol, writes its JSON and figures, and reuses a finished run. A tiny random BERT (2 layers, width 32)
saved with the MiniLM tokenizer stands in for the real model, so that it runs in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mp_model.recipe import quickstart
from mp_model.recipe.evaluation import METHODS
from tests.utils import read_results

pytestmark = pytest.mark.usefixtures("cpu_user_settings")


def test_quickstart_trains_evaluates_plots_and_reuses_the_run(
    toy_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    argv = ["--model", str(toy_model), "--train-examples", "48", "--epochs", "1", "--eval-examples", "32"]
    argv += ["--out", str(out), "--no-progress"]
    assert quickstart.main(argv) == 0
    first = capsys.readouterr().out

    summary = read_results(out / "quickstart.json")
    rows = {row["method"]: row for row in summary["records"]}
    assert set(rows) == set(METHODS)
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["gflops"] > 0 and row["flops_speedup"] > 0
        assert row["latency_speedup"] > 0
        assert "e2e" not in row
    assert rows["dense"]["flops_speedup"] == pytest.approx(1.0)
    assert set(summary["provenance"]["seconds"]) == {"train", "evaluate", "plots"}

    evaluation = read_results(out / "eval.json")
    assert {r["method"] for r in evaluation["records"] if r["selected"]} == set(METHODS)
    assert not (out / "e2e.json").exists(), "the end-to-end benchmark is no part of the quick start"
    assert "python -m bench.e2e" in first, "the summary says how to run the end-to-end benchmark"
    for name in ("bucket_speedup.png", "pareto.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for method in METHODS:
        assert any(line.split()[:1] == [method] for line in first.splitlines()), f"table row for {method}"

    assert quickstart.main(argv) == 0
    second = capsys.readouterr().out
    assert "reusing" in second and "reusing" not in first
