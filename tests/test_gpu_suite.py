"""``python -m bench.gpu_suite``: the smoke mode end to end, a failing step, time limits and the target arithmetic."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.bench_kernels import KERNELS
from bench.gpu_suite import (
    BUDGET_S,
    E2E_PACKAGES,
    STEPS,
    TARGETS,
    TEST_PATHS,
    TIMEOUTS,
    WINDOW_STEPS,
    attention_targets,
    commands,
    e2e_targets,
    parse_args,
    profile_target,
)
from bench.gpu_tests import ROOT, junit_counts, pytest_command, run_step, run_tests
from bench.outcome_log import TEXT_CHARS, read_outcomes
from bench.provenance import device_name

STATUSES = ("ok", "failed", "timed out", "skipped")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One smoke run with the attention step made to fail: its summary, its stdout and its folder."""
    out = tmp_path_factory.mktemp("suite")
    command = [sys.executable, "-m", "bench.gpu_suite", "--smoke", "--out", str(out), "--fail-step", "attention"]
    command += ["--steps", ",".join(STEPS), "--budget", "600"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "summary.json").read_text()), done.stdout, out


def test_summary_has_every_key_and_the_device(smoke: tuple[dict, str, Path]) -> None:
    summary, _, _ = smoke
    assert {"provenance", "device", "mode", "steps", "targets", "wall_s"} <= set(summary)
    assert summary["mode"] == "smoke"
    assert summary["device"] == device_name("cpu")
    assert summary["provenance"]["git_commit"]
    assert set(summary["targets"]) == set(TARGETS)
    for name, target in summary["targets"].items():
        assert {"value", "target", "met", "definition", "step"} <= set(target), name
        assert target["value"] is None or isinstance(target["value"], float)


def test_each_step_has_a_status_and_a_failing_one_does_not_stop_the_others(smoke: tuple[dict, str, Path]) -> None:
    summary, stdout, out = smoke
    steps = summary["steps"]
    assert list(steps) == list(STEPS)
    for name, step in steps.items():
        assert step["status"] in STATUSES and step["wall_s"] >= 0, name
    failed = steps["attention"]
    assert failed["status"] == "failed" and failed["returncode"] != 0
    assert any("deliberate failure" in line for line in failed["stderr_tail"])
    assert summary["targets"]["attention_vs_best_sdpa"]["value"] is None
    assert summary["targets"]["importance_overhead"]["value"] is None
    # the steps after it ran, teeing their output, and their numbers were read
    assert steps["tests"]["status"] == "ok" and steps["tests"]["counts"]["passed"] > 0
    for name in ("compaction", "gemm", "profile", "gemm_table", "kernels"):
        assert steps[name]["status"] == "ok", steps[name]
        assert (out / f"{name}.log").read_text().startswith("$ ")
    assert json.loads((out / "profile.json").read_text())["records"], "the profile wrote its cells"
    assert "entries" in json.loads((out / "gemm_table.json").read_text())
    assert {r["kernel"] for r in json.loads((out / "kernels.json").read_text())["records"]} == set(KERNELS)
    assert summary["targets"]["compaction_exit_share"]["value"] > 0
    assert summary["targets"]["gemm_fraction_of_peak"]["value"] > 0
    e2e_ready = all(importlib.util.find_spec(p) for p in E2E_PACKAGES)
    assert (steps["e2e"]["status"] != "skipped") == e2e_ready
    assert stdout.rstrip().splitlines()[-1].startswith("gemm_fraction_of_peak")


def test_the_window_runs_the_gpu_issues_steps_first_and_within_the_budget() -> None:
    """One device call: #38's tests, then #37's profile, end to end and GEMM table, in that order, their limits
    within the budget (a call may run 600 s)."""
    args = parse_args(["--out", "/tmp/unused"])
    assert args.steps == list(WINDOW_STEPS) == ["tests", "profile", "e2e", "gemm_table"]
    assert "kernels" in STEPS and "kernels" in TIMEOUTS, "the kernels' benchmark runs on request"
    assert sum(TIMEOUTS[step] for step in WINDOW_STEPS) <= BUDGET_S <= 570


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path: Path) -> None:
    begin = time.monotonic()
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    record = run_step("sleep", command, 2.0, tmp_path, {"PATH": "/usr/bin:/bin"})
    assert record["status"] == "timed out" and time.monotonic() - begin < 20
    assert "started" in (tmp_path / "sleep.log").read_text()


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="t" name="a"><failure/></testcase><testcase classname="t" name="b"><error/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = junit_counts(xml)
    assert counts == {"passed": 2, "failed": 1, "skipped": 1, "errors": 1, "failed_tests": ["t::a", "t::b"]}
    assert junit_counts(tmp_path / "missing.xml") is None


def record(model: str, bucket: str, batch: int, method: str, ms: float, flops_speedup: float = 1.0) -> dict:
    cell = {"model": model, "bucket": bucket, "batch_size": batch}
    return cell | {"method": method, "median_ms": ms, "flops_speedup": flops_speedup}


def test_e2e_targets_fall_back_to_mp_and_hf_sdpa() -> None:
    records = [
        # batch 64: graph_mp in one cell, only mp in the other
        record("a", "short", 64, "hf_sdpa", 10.0),
        record("a", "short", 64, "graph_mp", 4.0, flops_speedup=2.0),  # 2.5 / 2 = 1.25
        record("a", "short", 64, "mp", 8.0, flops_speedup=2.0),
        record("a", "long", 64, "hf_sdpa", 10.0),
        record("a", "long", 64, "mp", 8.0, flops_speedup=2.5),  # 1.25 / 2.5 = 0.5
        # batch 1: the faster of hf_compiled and hf_sdpa is the baseline
        record("a", "short", 1, "hf_sdpa", 3.0),
        record("a", "short", 1, "hf_compiled", 2.0),
        record("a", "short", 1, "graph_mp", 1.0),  # 2.0
        record("a", "long", 1, "hf_sdpa", 3.0),
        record("a", "long", 1, "mp", 2.0),  # 1.5
    ]
    found = e2e_targets({"records": records, "provenance": {"skipped_time_limit": [], "failed": []}})
    value, details = found["e2e_b64_measured_over_flops_speedup"]
    assert value == pytest.approx(0.5) and details["batch_size"] == 64
    assert details["mp_method"] == ["graph_mp", "mp"]
    value, details = found["e2e_b1_vs_dense"]
    assert value == pytest.approx(1.5) and details["dense_method"] == ["hf_compiled", "hf_sdpa"]


def test_e2e_targets_of_the_gpu_engine_against_compiled_hf() -> None:
    records = [
        record("bert-base", "short", 1, "hf_compiled", 0.8),
        record("bert-base", "short", 1, "graph_mp", 0.4),  # 2.0
        record("bert-base", "long", 1, "hf_compiled", 0.9),
        record("bert-base", "long", 1, "graph_mp", 0.6),  # 1.5, and the slowest BERT-base batch-1 bucket
        record("minilm", "long", 8, "hf_compiled", 1.0),
        record("minilm", "long", 8, "graph_mp", 1.25),  # 0.8, the worst cell
        record("minilm", "short", 8, "graph_mp", 9.0),  # no compiled twin: left out
    ]
    found = e2e_targets({"records": records, "provenance": {"skipped_time_limit": [], "failed": []}})
    value, details = found["e2e_graph_vs_compiled"]
    assert value == pytest.approx(0.8) and len(details["cells"]) == 3
    value, details = found["e2e_bert_base_b1_ms"]
    assert value == pytest.approx(0.6) and details["buckets"] == {"short": 0.4, "long": 0.6}


def test_profile_target_is_the_exit_and_compaction_share_at_batch_1_on_long_inputs() -> None:
    def cell(model: str, batch: int, bucket: str, shares: dict[str, float]) -> dict:
        rows = [{"name": name, "share": share} for name, share in shares.items()]
        return {"model": model, "batch_size": batch, "bucket": bucket, "method": "graph_mp", "by_name": rows}

    records = [
        cell("bert-base", 1, "long", {"_rows_linear_kernel": 0.8, "_exit_step_kernel": 0.05, "_move_kernel": 0.02}),
        cell("minilm", 1, "long", {"_rows_linear_kernel": 0.7, "_exit_step_kernel": 0.12}),
        cell("minilm", 1, "short", {"_exit_step_kernel": 0.9}),  # not at batch 1 on long inputs: not read
        {"model": "minilm", "batch_size": 1, "bucket": "long", "method": "hf_compiled", "by_name": []},
    ]
    value, details = profile_target(records)
    assert value == pytest.approx(0.12) and set(details["cells"]) == {"bert-base/long/b1", "minilm/long/b1"}


def test_attention_targets_read_bfloat16_only() -> None:
    def rec(shape: str, lengths: list[int], dtype: str, method: str, ms: float) -> dict:
        return {"shape": shape, "lengths": lengths, "dtype": dtype, "method": method, "median_ms": ms, "status": "ok"}

    records = []
    for dtype, scale in (("float16", 100.0), ("bfloat16", 1.0)):
        records += [
            rec("n128", [128, 128], dtype, "mp", 2.0 * scale),
            rec("n128", [128, 128], dtype, "mp+importance", 2.4 * scale),
            rec("n128", [128, 128], dtype, "sdpa-flash", 1.8 * scale),
            rec("n128", [128, 128], dtype, "sdpa-math", 5.0 * scale),
            rec("mixed", [16, 512], dtype, "mp", 1.0 * scale),
            rec("mixed", [16, 512], dtype, "mp+importance", 1.1 * scale),
            rec("mixed", [16, 512], dtype, "sdpa-efficient", 3.5 * scale),
            rec("mixed", [16, 512], dtype, "eager", 0.1 * scale),  # not an SDPA backend
        ]
    found = attention_targets(records)
    assert found["attention_vs_best_sdpa"][0] == pytest.approx(0.9)
    assert found["attention_mixed_vs_best_sdpa"][0] == pytest.approx(3.5)
    assert found["importance_overhead"][0] == pytest.approx(1.2)


def test_tests_args_reach_pytest_before_the_test_paths(tmp_path: Path) -> None:
    args = argparse.Namespace(smoke=False, tests_args="-n 8 -x", methods=None, e2e_models=None, e2e_args="")
    command = commands(args, tmp_path, dict.fromkeys(STEPS, 100.0))["tests"]
    assert command[-len(TEST_PATHS) - 3 :] == ["-n", "8", "-x", *TEST_PATHS]
    assert TEST_PATHS[-1] == "tests" and TEST_PATHS.index("tests/test_graph_engine.py") < len(TEST_PATHS) - 1, (
        "the kernels' and the engine's tests first, then the rest"
    )
    assert f"--junitxml={tmp_path / 'tests.xml'}" in command and "-v" in command


SAMPLE_TESTS = """
import os
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "x" * 10000

def test_a_cuda_error():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_after_the_cuda_error():
    pass

@pytest.fixture
def broken():
    raise ValueError("set-up fails")

def test_errors(broken):
    pass

def test_skips():
    pytest.skip("not here")

@pytest.mark.xfail(reason="known")
def test_xfails():
    assert False

@pytest.mark.out_of_range
def test_isolated_passes():
    pass

@pytest.mark.out_of_range
def test_isolated_crash():
    os.abort()
"""


def test_the_tests_step_survives_crashes_and_cuda_errors_and_counts_by_name(tmp_path: Path) -> None:
    """Out-of-range tests run alone (a crash is named), the main run resumes after a CUDA error in a fresh process,
    and every outcome, with failure text cut to a few KB, is in the outcome log as it happened."""
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE_TESTS)
    out = tmp_path / "out"
    out.mkdir()
    paths = [str(sample)]
    command = [*pytest_command(out), "-v", "--stop-on-cuda-error", "-m", "not out_of_range"]
    command += [f"--junitxml={out / 'tests.xml'}", *paths]
    record = run_tests(command, paths, 120.0, out, {**os.environ, "PYTHONUNBUFFERED": "1"}, smoke=True)
    outcomes = read_outcomes(out / "tests-outcomes.jsonl")
    by_name = {nodeid.split("::")[1]: r["outcome"] for nodeid, r in outcomes.items()}
    assert by_name == {
        "test_isolated_passes": "passed",
        "test_isolated_crash": "crashed",
        "test_passes": "passed",
        "test_fails": "failed",
        "test_a_cuda_error": "failed",
        "test_after_the_cuda_error": "passed",  # in the resumed process
        "test_errors": "error",
        "test_skips": "skipped",
        "test_xfails": "xfailed",
    }
    assert record["resumed"] == 1 and record["isolated"]["tests"] == 2
    counts = record["counts"]
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (3, 2, 2, 1)
    assert counts["crashed"] == 1 and any(name.endswith("test_isolated_crash") for name in counts["failed_tests"])
    assert all(len(r.get("text", "")) <= TEXT_CHARS for r in outcomes.values())
    failures = (out / "tests-failures.txt").read_text()
    assert "test_isolated_crash (crashed)" in failures and "illegal memory access" in failures
    assert record["sanitizer"]["status"] == "skipped"
