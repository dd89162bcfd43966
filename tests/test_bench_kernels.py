"""``python -m bench.bench_kernels --smoke``: every engine kernel at toy shapes on the CPU, one JSON record per kernel,
shape and method, with its ratios to the kernel, its launches and its throughput."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_kernels import KERNELS, SMOKE_BUCKETS, SMOKE_MODELS, parse_args
from bench.gpu_tests import ROOT

# The shapes and methods each kernel is timed with (linear_add_layer_norm at both of the engine's call sites).
SHAPES = {
    "embed_pack": {"embed": {"mp", "torch"}},
    "varlen_attention": {"attention_plan": {"mp", "mp_no_plan", "torch"}},
    "linear_add_layer_norm": {"attention_output": {"mp", "torch"}, "ffn_output": {"mp", "torch"}},
    "exit_step": {"exit": {"mp", "torch"}},
    "compact_tokens": {"drop": {"mp", "torch"}},
    "finish_slots": {"finish": {"mp", "torch"}},
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("kernels") / "kernels.json"
    command = [sys.executable, "-m", "bench.bench_kernels", "--smoke", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}" in done.stdout
    return json.loads(out.read_text())


def test_every_kernel_shape_and_method_has_one_record(smoke: dict) -> None:
    assert set(KERNELS) == set(SHAPES)
    found: dict[tuple, int] = {}
    for r in smoke["records"]:
        key = (r["kernel"], r["model"], r["batch"], r["width"], r["shape"], r["method"])
        found[key] = found.get(key, 0) + 1
    expected = {
        (kernel, model, batch, width, shape, method)
        for kernel, shapes in SHAPES.items()
        for shape, methods in shapes.items()
        for method in methods
        for model in SMOKE_MODELS
        for batch, width in SMOKE_BUCKETS
    }
    assert set(found) == expected and set(found.values()) == {1}


def test_records_hold_times_ratios_launches_and_throughput(smoke: dict) -> None:
    for r in smoke["records"]:
        assert r["dtype"] == "float32" and 0 < r["min_us"] <= r["median_us"] and r["iqr_us"] >= 0, r
        assert r["vs_mp"] > 0 and r["launches"] >= 1, r
        assert r["graph_us"] is None and r["graph_vs_mp"] is None, "no CUDA graphs on the CPU"
        assert (r.get("gbps") or r.get("tflops")) > 0, r
        if r["method"] == "mp":
            assert r["vs_mp"] == 1.0 and r["speedup"] > 0
            assert r["triton_launches"] >= 1 and r["programs"] >= r["triton_launches"], r
        else:
            assert "speedup" not in r, r
        if r["method"] == "torch":
            assert r["triton_launches"] == 0 and r["launches"] >= 1, "the baseline is plain PyTorch"


def test_every_engine_kernel_runs_in_one_launch_and_the_plan_rides_on_attention(smoke: dict) -> None:
    """The engine's kernels are one Triton launch each; the pruning plan adds at most one to attention alone."""
    launches = {(r["kernel"], r["method"]): r["triton_launches"] for r in smoke["records"]}
    for kernel in ("embed_pack", "linear_add_layer_norm", "exit_step", "compact_tokens", "finish_slots"):
        assert launches[kernel, "mp"] == 1, kernel
    assert launches["varlen_attention", "mp"] - launches["varlen_attention", "mp_no_plan"] <= 1


def test_the_provenance_names_the_benchmark_and_its_sizes(smoke: dict) -> None:
    meta = smoke["provenance"]
    assert meta["benchmark"] == "kernels" and meta["mode"] == "smoke" and meta["git_commit"]
    assert set(meta["models"]) == set(SMOKE_MODELS) and meta["skipped_time_limit"] == []


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--kernels", "rows_linear"], ["--models", "gpt2"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "error" in capsys.readouterr().err
    assert parse_args(["--kernels", "exit_step"]).kernels == ("exit_step",)


def test_the_default_output_is_in_the_kernels_folder() -> None:
    from bench.provenance import KERNELS_DIR

    assert KERNELS_DIR == Path(ROOT) / "bench" / "results" / "kernels"
