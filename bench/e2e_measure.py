"""Measurement of ``bench.e2e``: subjects, the methods' runners, timing passes and one cell's records.

Methods (one set of weights per model):

* ``hf_eager``, ``hf_sdpa``: HF ``BertForSequenceClassification`` on the padded batch (``hf_sdpa``: the
  reference of every ``latency_speedup``).
* ``hf_compiled``: the sdpa twin under ``torch.compile(mode="reduce-overhead", dynamic=False)`` (CUDA graphs on
  a GPU), on batches right-padded further to the widths of ``WIDTH_BUCKETS``, so that one graph serves each
  (batch size, width bucket); its compilation and graph capture run before the timed passes (``compile_s``).
* ``dense``, ``ltp``, ``fastbert``, ``mp``: the packed path with the knobs of ``PACKED_METHODS``, on
  ``Subject.packed_engine`` (``--packed-engine``: by default ``engine="ort"`` on a CPU where it runs, which runs a
  lone sequence's layers through ONNX Runtime, else ``engine="packed"``).
* ``graph_dense``, ``graph_ltp``, ``graph_fastbert``, ``graph_mp``: the same knobs on ``engine="graph"``
  (``mp_model/graph_engine.py``), whose CUDA graphs ``model.graph_engine.warm_up`` captures before the timed
  passes (``compile_s``, ``graph_stats``).
* ``ort`` (CPU, opt-in through ``--methods``): the HF twin exported to ONNX, optimised by ORT's transformer
  optimizer and run by ONNX Runtime on the padded batch with ``torch.get_num_threads()`` intra-op threads
  (``bench/e2e_ort.py``), built once per model and thread count (``compile_s`` of its first cell); the reference of
  ``speedup_vs_ort``. Without ``onnx`` and ``onnxruntime`` it is skipped with the install hint.

``hf_compiled``, the graph methods and ``ort`` may fail where their machinery is missing (no compiler, no graph
engine, no onnxruntime): ``measure_cell`` then reports the error instead of a record, and the sweep goes on.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.e2e_inputs import pad_to_buckets
from bench.e2e_models import MethodUnavailable, Subject, build_model, engine_knobs, packed_engine
from bench.e2e_ort import ORT_METHOD, build_ort
from bench.e2e_profile import importance_overhead, profile_ranges, stage_split
from bench.e2e_schedule import Schedule, calibrate_thresholds
from bench.timing import median_ms
from mp_model.flops import dense_flops
from mp_model.hf_twin import hf_twin

# (prune, early_exit) of each packed method.
PACKED_METHODS = {"dense": (False, False), "ltp": (True, False), "fastbert": (False, True), "mp": (True, True)}
# Graph-engine method -> the packed method whose knobs it runs.
GRAPH_METHODS = {f"graph_{name}": name for name in PACKED_METHODS}
COMPILED = "hf_compiled"
BASELINE = "hf_sdpa"
# Default methods everywhere; ``CUDA_METHODS`` are added by default on CUDA (on CPU through ``--methods``).
METHODS = ("hf_eager", "hf_sdpa", *PACKED_METHODS)
CUDA_METHODS = (COMPILED, *GRAPH_METHODS)
ALL_METHODS = (*METHODS, *CUDA_METHODS)
# Methods ``--methods`` accepts: all of the above and the ONNX Runtime baseline (CPU, opt-in).
CHOICES = (*ALL_METHODS, ORT_METHOD)
# Methods whose failure is recorded (and the method dropped for the model) instead of stopping the run.
OPTIONAL_METHODS = (*CUDA_METHODS, ORT_METHOD)
# Untimed calls per distinct batch before timing ``hf_compiled``: compile (or eager warm-up), graph recording,
# first replay (the steps of torch's CUDA graph trees).
COMPILE_CALLS = 3
# Dynamo's per-function cache must hold one entry per (batch size, width bucket) of the sweep.
DYNAMO_CACHE_LIMIT = 256
DYNAMO_LIMITS = ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit")

# Failure messages are cut to this length (compiler errors run to pages).
ERROR_CHARS = 2000

Batch = dict[str, torch.Tensor]


def make_subject(
    name: str,
    args: Any,
    tokenizer_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    calibration: Batch,
    schedule: Callable[[], Schedule],
    backend: str | None,
) -> Subject:
    """Load or build model ``name`` (``bench.e2e_models.build_model``) with its HF twins; prepare pruning and exits.

    ``args`` holds ``model``, ``num_labels``, ``seed``, ``tau`` and ``threshold_scale`` (``bench.e2e``'s options).
    A model with trained thresholds runs natively; any other replays ``schedule()`` resampled to its depth, with
    thresholds calibrated once on ``calibration``.
    """
    model, path = build_model(
        name, model=args.model, tokenizer_dir=tokenizer_dir, num_labels=args.num_labels, seed=args.seed
    )
    model = model.to(device=device, dtype=dtype).eval()
    native = bool((model.thresholds > 0).any())
    tau = model.config.exit_tau if args.tau is None else args.tau
    subject = Subject(name, path, model, {a: hf_twin(model, a) for a in ("eager", "sdpa")}, native, tau)
    subject.check_batch = calibration
    subject.packed_engine = packed_engine(model, getattr(args, "packed_engine", "auto"))
    if native:
        subject.threshold_scale = args.threshold_scale
    else:
        subject.schedule = schedule().resampled(model.config.num_hidden_layers)
        subject.calibration = calibrate_thresholds(model, calibration, subject.schedule.kept_ratio, backend=backend)
    return subject


def compiled_twin(subject: Subject) -> torch.nn.Module:
    """The sdpa twin under ``torch.compile(mode="reduce-overhead", dynamic=False)``, built once per subject.

    Dynamo's recompilation limits are raised to ``DYNAMO_CACHE_LIMIT``: with static shapes every (batch size,
    width bucket) is a new compilation.
    """
    if "compiled" not in subject.hf:
        config = torch._dynamo.config
        for name in DYNAMO_LIMITS:
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), DYNAMO_CACHE_LIMIT))
        subject.hf["compiled"] = torch.compile(subject.hf["sdpa"], mode="reduce-overhead", dynamic=False)
    return subject.hf["compiled"]


def runner(subject: Subject, method: str, backend: str | None) -> Callable[[Batch], object]:
    """A function running ``method`` of ``subject`` on one batch dict (``hf_compiled``: on bucket-padded batches)."""
    if method == COMPILED:
        compiled = compiled_twin(subject)

        def call(x: Batch) -> object:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(
                input_ids=x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
            ).logits

        return call
    if method == ORT_METHOD:
        return subject.ort[torch.get_num_threads()]
    if method.startswith("hf_"):
        hf = subject.hf[method.removeprefix("hf_")]
        return lambda x: (
            hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]).logits
        )
    engine: dict[str, Any] = dict(
        engine_knobs(subject.model, "graph" if method in GRAPH_METHODS else subject.packed_engine)
    )
    if method in GRAPH_METHODS and "validate" in inspect.signature(subject.model.forward).parameters:
        engine["validate"] = False  # the benchmark's masks are valid; checking them is a host read per call
    prune, early_exit = PACKED_METHODS[GRAPH_METHODS.get(method, method)]
    replay = early_exit and not subject.native
    return lambda x: subject.model(
        x["input_ids"],
        x["attention_mask"],
        x["token_type_ids"],
        tau=subject.tau,
        threshold_scale=subject.threshold_scale,
        prune=prune,
        early_exit=early_exit,
        backend=backend,
        exit_schedule=x["exit_schedule"] if replay else None,
        **engine,
    )


def method_inputs(subject: Subject, method: str, inputs: list[Batch]) -> list[Batch]:
    """The batches ``method`` runs: ``inputs``, right-padded to the width buckets for ``hf_compiled``."""
    if method != COMPILED:
        return inputs
    config = subject.model.config
    return pad_to_buckets(inputs, config.max_position_embeddings, config.pad_token_id or 0)


def output_stats(subject: Subject, method: str, inputs: list[Batch], outputs: list[object]) -> dict[str, Any]:
    """Per-example FLOPs and realised kept shares / exit layers of a method over a cell's inputs."""
    config = subject.model.config
    layers = config.num_hidden_layers
    lengths = torch.cat([x["attention_mask"].sum(dim=1).cpu() for x in inputs])
    widths = torch.cat([torch.full((x["input_ids"].shape[0],), x["input_ids"].shape[1]) for x in inputs])
    dense = dense_flops(config, lengths).double()
    stats: dict[str, Any] = {
        "examples": int(lengths.numel()),
        "tokens_per_example": float(lengths.double().mean()),
        "padded_width": float(widths.double().mean()),
        "dense_gflops": float(dense.mean()) / 1e9,
        "padded_gflops": float(dense_flops(config, widths).double().mean()) / 1e9,
    }
    if method.startswith("hf_") or method == ORT_METHOD:
        return stats | {"gflops": stats["dense_gflops"], "flops_speedup": 1.0, "mean_exit_layer": float(layers)}
    flops = torch.cat([out.flops.cpu() for out in outputs]).double()
    kept = torch.cat([out.kept_tokens.cpu() for out in outputs]).double()
    exit_layer = torch.cat([out.exit_layer.cpu() for out in outputs])
    reached = torch.arange(1, layers + 1)[None, :] <= exit_layer[:, None]
    ran = (reached.double() * lengths.double()[:, None]).sum(dim=0)
    kept_share = (kept.sum(dim=0) / ran.clamp(min=1)).tolist()
    return stats | {
        "gflops": float(flops.mean()) / 1e9,
        "flops_speedup": float(dense.sum() / flops.sum()),
        "mean_exit_layer": float(exit_layer.double().mean()),
        "kept_ratio_per_layer": [k if r > 0 else None for k, r in zip(kept_share, ran.tolist(), strict=True)],
    }


def time_passes(
    fn: Callable[[Batch], object], inputs: list[Batch], *, device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Milliseconds per batch: ``bench.timing.median_ms`` of whole passes through ``inputs``, over their count.

    Timing passes rather than single calls keeps the measured time comparable with the FLOPs, which are summed
    over the same batches: a median of single calls would report the typical batch of a cell whose batches
    differ (lengths, exits), while the FLOPs weigh each batch by its work.
    """

    def one_pass(batches: list[Batch]) -> None:
        for batch in batches:
            fn(batch)

    timing = median_ms(one_pass, [inputs], device=device, warmup=warmup, repeats=repeats)
    return {key: value / len(inputs) for key, value in timing.items()}


def _host_copy(output: Any) -> object:
    """The counters of a model output, copied to the host (graph replays may reuse the device buffers)."""
    return types.SimpleNamespace(
        flops=output.flops.cpu(), kept_tokens=output.kept_tokens.cpu(), exit_layer=output.exit_layer.cpu()
    )


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with what ``json`` cannot write replaced by its ``str``."""

    def ready(value: Any) -> Any:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
        return value

    return {key: ready(value) for key, value in values.items()}


def prepare(
    subject: Subject,
    method: str,
    fn: Callable[[Batch], object],
    inputs: list[Batch],
    *,
    backend: str | None,
    device: torch.device,
) -> tuple[float, list[object], dict[str, Any]]:
    """Untimed preparation of ``hf_compiled`` and the graph methods: compile / capture, then run each batch.

    Returns the wall seconds it took (synchronised), the graph methods' outputs (copied to the host) and extra
    record fields of the graph methods: ``graph_stats`` (``model.graph_engine.stats()`` after the cell, the
    engine's totals over the run so far), ``graph_capture_s`` (capture seconds spent in this cell) and
    ``graph_memory_bytes`` (GPU memory the engine's graphs hold after it).
    """
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    begin = time.perf_counter()
    extra: dict[str, Any] = {}
    outputs: list[object] = []
    if method == COMPILED:
        for _ in range(COMPILE_CALLS):
            for x in inputs:
                fn(x)
    else:
        engine = getattr(subject.model, "graph_engine", None)
        if engine is None:
            raise MethodUnavailable("the model has no graph_engine (mp_model/graph_engine.py)")
        prune, early_exit = PACKED_METHODS[GRAPH_METHODS[method]]
        replay = early_exit and not subject.native
        sizes = sorted({x["input_ids"].shape[0] for x in inputs})
        width = max(x["input_ids"].shape[1] for x in inputs)
        knobs = {"threshold_scale": subject.threshold_scale, "backend": backend}
        before = dict(engine.stats())
        resolved = subject.model.resolve_knobs(prune=prune, early_exit=early_exit, **knobs)
        engine.warm_up(sizes, width, resolved, exit_schedule=replay)
        outputs = [_host_copy(fn(x)) for x in inputs]
        after = dict(engine.stats())
        extra["graph_stats"] = _json_ready(after)
        extra["graph_capture_s"] = float(after.get("capture_s", 0.0)) - float(before.get("capture_s", 0.0))
        extra["graph_memory_bytes"] = after.get("graph_memory_bytes")
    synchronize()
    return time.perf_counter() - begin, outputs, extra


@dataclass
class Prepared:
    """A method ready to time on a cell: its runner, the batches it runs, its record so far and any outputs."""

    method: str
    fn: Callable[[Batch], object]
    inputs: list[Batch]
    record: dict[str, Any]
    outputs: list[object] = field(default_factory=list)


def prepare_method(
    subject: Subject, method: str, inputs: list[Batch], *, backend: str | None, device: torch.device
) -> Prepared:
    """Untimed set-up of one method on a cell: ``ort``'s session (once per model and thread count), compilation
    or graph capture (``prepare``)."""
    inputs = method_inputs(subject, method, inputs)
    record: dict[str, Any] = {"method": method, "compile_s": None}
    if method == ORT_METHOD:
        threads = torch.get_num_threads()
        built = threads not in subject.ort
        if built:
            subject.ort[threads] = build_ort(subject.model, subject.check_batch or inputs[0], threads)
        record["compile_s"] = subject.ort[threads].prepare_s if built else 0.0
    fn = runner(subject, method, backend)
    outputs: list[object] = []
    if method == COMPILED or method in GRAPH_METHODS:
        with torch.inference_mode():
            record["compile_s"], outputs, extra = prepare(subject, method, fn, inputs, backend=backend, device=device)
        record |= extra
    return Prepared(method, fn, inputs, record, outputs)


def time_interleaved(
    prepared: list[Prepared], *, device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Milliseconds per batch of every method: ``warmup + repeats`` rounds, each one pass per method (``time_passes``
    of one repeat), the methods' order rotated every round; median, minimum and IQR over the timed rounds.

    Interleaving puts every method under the same load, so that their ratios stay meaningful on a shared machine.
    """
    times: dict[str, list[float]] = {p.method: [] for p in prepared}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            shift = round_index % max(len(prepared), 1)
            for item in prepared[shift:] + prepared[:shift]:
                timing = time_passes(item.fn, item.inputs, device=device, warmup=0, repeats=1)
                if round_index >= warmup:
                    times[item.method].append(timing["median_ms"])
    result = {}
    for method, values in times.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[method] = {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "iqr_ms": quartiles[2] - quartiles[0],
        }
    return result


def finish_method(
    subject: Subject,
    item: Prepared,
    *,
    backend: str | None,
    device: torch.device,
    profile: bool,
    shares: dict[str, float],
) -> dict[str, Any]:
    """Profile (packed methods, when ``profile``) and count one timed method; returns its record.

    ``shares`` caches the cell's importance share of attention (``importance_overhead``) across methods.
    """
    method, fn, inputs, record, outputs = item.method, item.fn, item.inputs, item.record, item.outputs
    dtype = next(subject.model.parameters()).dtype
    record["stages_ms"] = None
    with torch.inference_mode():
        if method in PACKED_METHODS and profile:
            ranges, outputs = profile_ranges(fn, inputs, device)
            thresholds = subject.model.thresholds
            prunes = PACKED_METHODS[method][0] and bool((thresholds > 0).any())
            if prunes and "share" not in shares:
                shares["share"] = importance_overhead(inputs[0], subject.model.config, dtype, backend, repeats=3)
            share = shares.get("share")
            pruning_layers = float((thresholds > 0).double().mean()) if prunes else 0.0
            stages = stage_split(ranges, (share or 0.0) * pruning_layers)
            record["importance_share"] = share if prunes else None
            record["ranges_ms"] = ranges
            record["stages_ms"] = stages
            record["stage_share"] = {name: value / max(ranges["total"], 1e-9) for name, value in stages.items()}
        elif method in PACKED_METHODS:
            outputs = [_host_copy(fn(x)) for x in inputs]
    return record | output_stats(subject, method, inputs, outputs)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Set each record's ``latency_speedup`` (over ``hf_sdpa``), ``measured_over_flops``, ``speedup_vs_compiled``
    (over ``hf_compiled``) and ``speedup_vs_ort`` (over ``ort``) from the cell's records; ``None`` without the
    reference."""
    medians = {r["method"]: r["median_ms"] for r in records}
    for record in records:
        baseline, compiled, ort = medians.get(BASELINE), medians.get(COMPILED), medians.get(ORT_METHOD)
        speedup = None if baseline is None else baseline / record["median_ms"]
        record["latency_speedup"] = speedup
        record["measured_over_flops"] = None if speedup is None else speedup / record["flops_speedup"]
        record["speedup_vs_compiled"] = None if compiled is None else compiled / record["median_ms"]
        record["speedup_vs_ort"] = None if ort is None else ort / record["median_ms"]


def measure_cell(
    subject: Subject,
    bucket: str,
    batch_size: int,
    inputs: list[Batch],
    methods: Sequence[str],
    *,
    backend: str | None,
    device: torch.device,
    warmup: int,
    repeats: int,
    profile: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Prepare every method, time them interleaved (``time_interleaved``), then profile and count each, on one
    cell's inputs.

    Returns one record per method that ran and ``{method: error}`` for the ``OPTIONAL_METHODS`` that failed (an
    error of any other method propagates).
    """
    failed: dict[str, str] = {}
    prepared: list[Prepared] = []
    for method in methods:
        try:
            prepared.append(prepare_method(subject, method, inputs, backend=backend, device=device))
        except Exception as error:
            if method not in OPTIONAL_METHODS:
                raise
            failed[method] = f"{type(error).__name__}: {error}"[:ERROR_CHARS]
    timings = time_interleaved(prepared, device=device, warmup=warmup, repeats=repeats)
    records = []
    shares: dict[str, float] = {}
    for item in prepared:
        item.record |= timings[item.method]
        record = finish_method(subject, item, backend=backend, device=device, profile=profile, shares=shares)
        batch = {"model": subject.name, "bucket": bucket, "batch_size": batch_size}
        record = batch | record
        record["throughput_per_s"] = batch_size / record["median_ms"] * 1e3
        record["tokens_per_s"] = record["throughput_per_s"] * record["tokens_per_example"]
        records.append(record)
    add_ratios(records)
    return records, failed
