"""Where the GPU engine's time goes: per-kernel GPU time and the idle gaps between kernels, over graph replays.

For each model, batch size and input bucket, the graph engine (``graph_mp``) and, beside it, HF under
``torch.compile(mode="reduce-overhead")`` (``hf_compiled``) are warmed up, then ``--repeats`` passes through the
cell's batches run under ``torch.profiler`` with CUDA activity (CUPTI records each kernel node of a replayed CUDA
graph). ``kernel_split`` turns the kernel intervals into, per forward: the kernels launched, the GPU busy time
(union of kernel intervals), the idle time (the profiled window's wall time minus busy, per forward) and, per
kernel name, its count, time and share of busy time. Models and inputs are ``bench.e2e``'s (random BERT-base, the
embedded MiniLM; untrained models replay the default pruning and exit schedule), in ``--dtype`` (bf16).

``python -m bench.gpu_profile --out $OUT/profile.json`` on a GPU; ``--smoke`` runs the plumbing on a CPU (tiny
model, Triton interpreter, no CUDA kernels to record, so the splits are empty).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench.e2e_inputs import batch_count, build_pools, calibration_batch, cell_batches  # noqa: E402
from bench.e2e_measure import make_subject, method_inputs, runner  # noqa: E402
from bench.e2e_models import tokenizer_path  # noqa: E402
from bench.e2e_schedule import DEFAULT_SCHEDULE  # noqa: E402
from bench.provenance import provenance, write_results  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ("graph_mp", "hf_compiled")
TOP_KERNELS = 25


def kernel_split(intervals: Sequence[tuple[str, float, float]], forwards: int, wall_us: float) -> dict[str, Any]:
    """Per-forward split of the kernels ``(name, start_us, end_us)`` recorded over ``forwards`` forwards.

    Returns ``kernels`` (launches per forward), ``busy_us`` (union of the intervals per forward), ``idle_us``
    (``wall_us`` per forward minus ``busy_us``, at least 0), ``sum_us`` (kernel durations added, per forward) and
    ``by_name``: for each kernel name, most time first (at most ``TOP_KERNELS``, the rest summed as ``"(other)"``),
    ``count`` and ``us`` per forward and ``share`` of the summed kernel time.
    """
    if forwards < 1:
        raise ValueError(f"forwards must be >= 1, got {forwards}")
    busy = 0.0
    reach = float("-inf")
    for _, start, end in sorted(intervals, key=lambda item: item[1]):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    total = sum(end - start for _, start, end in intervals)
    names: dict[str, list[float]] = {}
    for name, start, end in intervals:
        entry = names.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += end - start
    ranked = sorted(names.items(), key=lambda item: -item[1][1])
    rows = [
        {"name": name, "count": count / forwards, "us": us / forwards, "share": us / total if total else 0.0}
        for name, (count, us) in ranked[:TOP_KERNELS]
    ]
    rest = ranked[TOP_KERNELS:]
    if rest:
        count, us = sum(c for _, (c, _) in rest), sum(u for _, (_, u) in rest)
        rows.append({"name": "(other)", "count": count / forwards, "us": us / forwards, "share": us / total})
    return {
        "kernels": len(intervals) / forwards,
        "busy_us": busy / forwards,
        "idle_us": max(0.0, wall_us / forwards - busy / forwards),
        "sum_us": total / forwards,
        "by_name": rows,
    }


def profile_method(call: Callable[[dict[str, torch.Tensor]], object], inputs: list[dict], repeats: int) -> dict:
    """Warm up, then profile ``repeats`` passes over ``inputs``; ``kernel_split`` of what ran, plus wall time."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        for batch in inputs:
            call(batch)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(repeats):
            for batch in inputs:
                call(batch)
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - started) * 1e6
    intervals = [
        (event.name, event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > event.time_range.start
    ]
    forwards = repeats * len(inputs)
    return kernel_split(intervals, forwards, wall_us) | {"wall_us": wall_us / forwards, "forwards": forwards}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Profile every (model, batch size, bucket, method) cell of ``args``; returns records and metadata."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    backend = None if device.type == "cuda" else "triton"
    tokenizer_dir = tokenizer_path(None)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    largest = max(batch_count(b, args.rotate_examples) * b for b in args.batch_sizes)
    pools = build_pools(tokenizer, largest, args.max_length, args.seed)
    options = SimpleNamespace(model=None, num_labels=2, seed=args.seed, tau=None, threshold_scale=1.0)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    for name in args.models:
        calibration = calibration_batch(pools, 16, device)
        subject = make_subject(name, options, tokenizer_dir, device, dtype, calibration, lambda: DEFAULT_SCHEDULE,
                               backend)  # fmt: skip
        for batch_size in args.batch_sizes:
            for bucket in args.buckets:
                cell = {"model": name, "batch_size": batch_size, "bucket": bucket}
                if args.time_limit and time.perf_counter() - started > args.time_limit:
                    late.append(cell)
                    continue
                count = batch_count(batch_size, args.rotate_examples)
                inputs = cell_batches(pools[bucket], batch_size, count, device, subject.schedule.exit_distribution,
                                      args.seed)  # fmt: skip
                for method in args.methods:
                    try:
                        call = runner(subject, method, backend)
                        split = profile_method(call, method_inputs(subject, method, inputs), args.repeats)
                    except Exception as error:  # a method that cannot run here is recorded, the others go on
                        records.append(cell | {"method": method, "error": f"{type(error).__name__}: {error}"})
                        continue
                    records.append(cell | {"method": method} | split)
                    print(f"{name} b{batch_size} {bucket} {method}: {split['kernels']:.0f} kernels, "
                          f"busy {split['busy_us']:.0f} us, idle {split['idle_us']:.0f} us", flush=True)  # fmt: skip
    meta = {
        **provenance(device),
        "benchmark": "gpu_profile",
        "dtype": args.dtype,
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "skipped_time_limit": late,
        "total_seconds": time.perf_counter() - started,
        "timing": "per forward: kernels recorded by torch.profiler (CUPTI) over the profiled passes after 3 warm-up "
        "passes; busy = union of kernel intervals; idle = wall time of the profiled passes minus busy",
    }
    return records, meta


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON path")
    parser.add_argument("--models", type=_csv(str), default=["bert-base", "minilm"])
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 8, 64])
    parser.add_argument("--buckets", type=_csv(str), default=["short", "long"])
    parser.add_argument("--methods", type=_csv(str), default=list(METHODS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="profiled passes through each cell's batches")
    parser.add_argument("--rotate-examples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=0.0, help="seconds; later cells are skipped (0: none)")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny model, batch 2, one pass")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batch_sizes, args.buckets = ["tiny"], [2], ["short"]
        args.methods, args.dtype, args.repeats, args.rotate_examples, args.max_length = (
            ["graph_mp"],
            "float32",
            1,
            2,
            128,
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records, meta = run(args)
    write_results(args.out, records, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
