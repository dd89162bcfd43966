"""GEMM check: ``torch.nn.functional.linear`` (cuBLAS) and ``mp_kernels.rows_linear`` at BERT-base feed-forward shapes.

Times ``linear`` in bfloat16 at the two feed-forward GEMMs of BERT-base on 8192 tokens (8192 x 768 -> 3072 and
8192 x 3072 -> 768, with bias) and, when ``mp_kernels.rows_linear`` exists, the same shapes through it with every
row live (``n_rows`` holding 8192). Each record gives TFLOP/s (``2 * m * k * n`` per call) and its fraction of the
device's dense bfloat16 peak: the datasheet figure for a device whose name contains a key of ``PEAK_TFLOPS``, else
the cuBLAS figure measured at 8192 x 8192 x 8192 (recorded in every run). Writes ``{"provenance", "records"}`` JSON.

    python -m bench.gpu_gemm --out bench/results/kernels/gemm-$(hostname).json
    python -m bench.gpu_gemm --smoke --out /tmp/gemm.json    # CPU, float32, toy shapes (plumbing only)

Under ``--smoke`` ``rows_linear`` runs its default backend (Triton under ``TRITON_INTERPRET=1``).

``--table OUT.json`` instead measures the candidate plans of ``rows_linear`` at every GEMM of BERT-base and MiniLM
(fused QKV, attention output, feed-forward in and out) for the buffers of batch 1 and 8 at every width bucket (16
to 512 tokens a sequence), all rows live, in bfloat16: the planner's heuristic, its tiles and the base tiles with
``split_k`` in ``SPLITS``, and cuBLAS (``F.linear`` over the whole capacity). Each candidate runs ``GRAPH_CALLS``
times in a CUDA graph (the engine's launch path, no host overhead), replayed 30 times after 3 warm-ups: the median
of the CUDA-event times over ``GRAPH_CALLS``. The fastest correct candidate of each shape becomes its entry in the table
that ``plan_rows_linear`` reads; entries of other devices in the shipped table are kept. Shapes left when
``--time-limit`` seconds have passed are not measured (the count is printed and recorded in the provenance).

    python -m bench.gpu_gemm --table mp_kernels/_triton/gemm_table.json --time-limit 300
    python -m bench.gpu_gemm --smoke --table /tmp/gemm_table.json    # CPU interpreter, float32, a toy model
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.provenance import device_name, provenance, write_results
from bench.timing import median_ms

# Dense bfloat16 tensor-core peak in TFLOP/s (no sparsity), by device-name substring; the first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100 SXM", 989.0),
    ("H100 80GB HBM3", 989.0),
    ("H200", 989.0),
)
# (name, rows m, input width k, output width n): x (m, k) @ weight (n, k)^T + bias (n,).
GPU_SHAPES = (("ffn_in", 8192, 768, 3072), ("ffn_out", 8192, 3072, 768))
SMOKE_SHAPES = (("ffn_in", 64, 48, 192), ("ffn_out", 64, 192, 48))
GPU_PEAK_SIZE, SMOKE_PEAK_SIZE = 8192, 256


def table_peak(name: str) -> tuple[float | None, str | None]:
    """The datasheet peak TFLOP/s of the device called ``name`` and the matching key, or ``(None, None)``."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak, key
    return None, None


def time_call(
    fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], device: torch.device
) -> dict[str, float]:
    """``bench.timing.median_ms`` with more repeats on a GPU (calls of tens of microseconds)."""
    gpu = device.type == "cuda"
    return median_ms(fn, inputs, device=device, warmup=10 if gpu else 1, repeats=100 if gpu else 3)


def shape_records(
    shape: tuple[str, int, int, int], dtype: torch.dtype, device: torch.device, rows_linear: Callable | None, why: str
) -> list[dict[str, Any]]:
    """Time ``linear`` and ``rows_linear`` (``None``: recorded with status ``why``) at one shape ``(name, m, k, n)``."""
    name, m, k, n = shape
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(m, k, generator=generator, device=device, dtype=dtype) for _ in range(3)]
    weight = torch.randn(n, k, generator=generator, device=device, dtype=dtype) / k**0.5
    bias = torch.randn(n, generator=generator, device=device, dtype=dtype)
    n_rows = torch.full((1,), m, dtype=torch.int32, device=device)
    base = {"shape": name, "m": m, "k": k, "n": n, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * m * k * n}
    expected = F.linear(inputs[0], weight, bias).float()
    ops = {
        "linear": lambda x: F.linear(x, weight, bias),
        "rows_linear": None if rows_linear is None else lambda x: rows_linear(x, weight, bias, n_rows),
    }
    records: list[dict[str, Any]] = []
    for op, fn in ops.items():
        if fn is None:
            records.append({"op": op, **base, "status": why})
            continue
        try:
            diff = float((fn(inputs[0]).float() - expected).abs().max())
            timing = time_call(fn, inputs, device)
        except Exception as error:  # a kernel under development: record its failure, time the others
            records.append({"op": op, **base, "status": f"failed: {type(error).__name__}: {error}"[:300]})
            continue
        tflops = base["flops"] / (timing["median_ms"] * 1e9)
        records.append({"op": op, **base, **timing, "status": "ok", "tflops": tflops, "max_abs_diff_vs_linear": diff})
    return records


def gemm_records(shapes: tuple[tuple[str, int, int, int], ...], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """``shape_records`` at every shape, with ``mp_kernels.rows_linear`` where it can be imported."""
    try:
        from mp_kernels.rows_linear import rows_linear
    except ImportError as error:
        return [r for shape in shapes for r in shape_records(shape, dtype, device, None, f"unavailable: {error}")]
    return [r for shape in shapes for r in shape_records(shape, dtype, device, rows_linear, "")]


def measured_peak(size: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """cuBLAS (``linear``, no bias) TFLOP/s at ``size`` x ``size`` x ``size``: the peak of an unlisted device."""
    x = [torch.randn(size, size, device=device, dtype=dtype) for _ in range(2)]
    weight = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_call(lambda a: F.linear(a, weight), x, device)
    flops = 2 * size**3
    shape = {
        "op": "linear",
        "shape": "peak",
        "m": size,
        "k": size,
        "n": size,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return {**shape, "flops": flops, **timing, "status": "ok", "tflops": flops / (timing["median_ms"] * 1e9)}


def run(smoke: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every record of the chosen mode and the peak used: bfloat16 on CUDA, or float32 toy shapes on the CPU."""
    if smoke:
        device, dtype, shapes, peak_size = torch.device("cpu"), torch.float32, SMOKE_SHAPES, SMOKE_PEAK_SIZE
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU plumbing check")
        device, dtype, shapes, peak_size = torch.device("cuda"), torch.bfloat16, GPU_SHAPES, GPU_PEAK_SIZE
    records = gemm_records(shapes, dtype, device)
    peak_record = measured_peak(peak_size, dtype, device)
    peak, key = table_peak(device_name(device))
    source = (
        f"datasheet, device name contains {key!r}" if key else f"measured: linear at {peak_size}^3 on {device.type}"
    )
    peak = peak if peak is not None else peak_record["tflops"]
    for record in (*records, peak_record):
        if record["status"] == "ok":
            record["fraction_of_peak"] = record["tflops"] / peak
    meta = {**provenance(device), "benchmark": "gemm", "peak_tflops": peak, "peak_source": source}
    return [*records, peak_record], meta


def ffn_fraction_of_peak(records: list[dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
    """The lower ``fraction_of_peak`` of the two feed-forward shapes for ``rows_linear`` if it ran, else ``linear``,
    with the op and its per-shape fractions and TFLOP/s."""
    ffn = [r for r in records if r["shape"] != "peak" and r["status"] == "ok"]
    op = "rows_linear" if any(r["op"] == "rows_linear" for r in ffn) else "linear"
    chosen = [r for r in ffn if r["op"] == op]
    details = {"op": op, "fractions": {r["shape"]: r["fraction_of_peak"] for r in chosen}}
    details["tflops"] = {r["shape"]: r["tflops"] for r in chosen}
    return min(details["fractions"].values(), default=None), details


# --table: (name, (d, d_ff)) of each model, and each GEMM's (name, k, n, activation) in terms of d and d_ff.
TABLE_MODELS = (("bert-base", (768, 3072)), ("minilm", (384, 1536)))
SMOKE_TABLE_MODELS = (("toy", (64, 128)),)  # capacities 16 and 32
TABLE_BATCHES, TABLE_WIDTHS = (1, 8), (16, 32, 64, 128, 256, 512)
SPLITS = (1, 2, 4, 8)
GRAPH_CALLS = 20


def model_gemms(d: int, d_ff: int) -> tuple[tuple[str, int, int, str | None], ...]:
    """A BERT layer's GEMMs ``(name, k, n, activation)`` at width ``d`` and feed-forward width ``d_ff``."""
    return (("qkv", d, 3 * d, None), ("attn_out", d, d, None), ("ffn_in", d, d_ff, "gelu"), ("ffn_out", d_ff, d, None))


def candidate_plans(dtype: torch.dtype, k: int, n: int, capacity: int, sm_count: int, name: str) -> dict[str, Any]:
    """``{label: GemmPlan or None}``: the heuristic plan, its tiles and the base tiles at every split of ``SPLITS``
    (duplicates dropped), and ``"cublas"`` (None)."""
    from mp_kernels._triton import rows_linear as kernel

    heuristic = kernel.plan_rows_linear(dtype, k, n, capacity, sm_count, name, use_table=False)
    plans = {"heuristic": heuristic}
    seen = {(heuristic.tiles, heuristic.split_k)}
    for label, tiles in (("tiles", heuristic.tiles), ("base", kernel.base_tiles(dtype, n, capacity, name))):
        for split_k in SPLITS:
            plan = kernel.make_plan(tiles, split_k, k, n, capacity, "table")
            if (plan.tiles, plan.split_k) not in seen:
                seen.add((plan.tiles, plan.split_k))
                plans[f"{label}-{tiles.block_m}x{tiles.block_n}x{tiles.block_k}-split{plan.split_k}"] = plan
    return {**plans, "cublas": None}


def graph_ms(fn: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], device: torch.device) -> float:
    """Median milliseconds of one call of ``fn``: ``GRAPH_CALLS`` calls on rotating ``inputs`` captured in a CUDA
    graph and timed by replays on a GPU; plain calls (``time_call``) on the CPU."""
    if device.type != "cuda":
        return time_call(fn, inputs, device)["median_ms"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(inputs[0])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            fn(inputs[i % len(inputs)])
    timing = median_ms(lambda _: graph.replay(), [None], device=device, warmup=3, repeats=30)
    return timing["median_ms"] / GRAPH_CALLS


def measure_shape(
    dtype: torch.dtype,
    k: int,
    n: int,
    capacity: int,
    activation: str | None,
    device: torch.device,
    traits: tuple[int, str],
) -> dict[str, Any]:
    """Time every candidate plan of one shape; ``{"median_ms": {label: ms}, "failed": {label: why}, "best": label,
    "plan": the best GemmPlan or None for cuBLAS}``. A candidate fails when it raises or misses ``F.linear`` by
    more than a few roundings of ``dtype``."""
    from mp_kernels._triton.rows_linear import rows_linear_triton
    from mp_kernels.rows_linear_reference import apply_activation, rows_linear_torch

    generator = torch.Generator(device=device).manual_seed(capacity + k + n)
    inputs = [torch.randn(capacity, k, generator=generator, device=device, dtype=dtype) for _ in range(3)]
    weight = torch.randn(n, k, generator=generator, device=device, dtype=dtype) / k**0.5
    bias = torch.randn(n, generator=generator, device=device, dtype=dtype)
    n_rows = torch.full((1,), capacity, dtype=torch.int32, device=device)
    want = apply_activation(F.linear(inputs[0].float(), weight.float(), bias.float()), activation)
    allowed = 16 * torch.finfo(dtype).eps * (1.0 + float(want.abs().max()))
    plans = candidate_plans(dtype, k, n, capacity, *traits)
    times: dict[str, float] = {}
    failed: dict[str, str] = {}
    for label, plan in plans.items():
        if plan is None:
            fn = lambda x: rows_linear_torch(x, weight, bias, n_rows, activation=activation)  # noqa: E731
        else:
            fn = lambda x, p=plan: rows_linear_triton(x, weight, bias, n_rows, activation=activation, plan=p)  # noqa: E731
        try:
            error = float((fn(inputs[0]).float() - want).abs().max())
            if not error <= allowed:
                raise ValueError(f"max error {error:.3g} above {allowed:.3g}")
            times[label] = graph_ms(fn, inputs, device)
        except Exception as exc:  # a candidate that does not compile or is wrong: recorded, never chosen
            failed[label] = f"{type(exc).__name__}: {exc}"[:200]
    best = min(times, key=times.get)
    return {"median_ms": times, "failed": failed, "best": best, "plan": plans[best]}


def table_entry(key: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The table's entry of one shape: its key, the winning backend with its tiles and split, the measurements."""
    plan = measured["plan"]
    choice: dict[str, Any] = {"backend": "cublas"}
    if plan is not None:
        choice = {"backend": "triton", **plan.tiles._asdict(), "split_k": plan.split_k}
    heuristic = measured["median_ms"].get("heuristic")
    speedup = None if heuristic is None else heuristic / measured["median_ms"][measured["best"]]
    extra = {"failed": measured["failed"]} if measured["failed"] else {}
    return {
        **key,
        **choice,
        "best": measured["best"],
        "speedup_vs_heuristic": speedup,
        "median_ms": measured["median_ms"],
        **extra,
    }


def table_setup(smoke: bool) -> tuple[torch.device, torch.dtype, list[tuple[str, str, int, int, str | None, int]]]:
    """The device, dtype and shapes ``(model, gemm, k, n, activation, capacity)`` of ``--table``, smallest
    capacities first (where splitting matters most, should the time limit cut the run short)."""
    if smoke:
        device, dtype, models, batches, widths = torch.device("cpu"), torch.float32, SMOKE_TABLE_MODELS, (1,), (16, 32)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU plumbing check")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        models, batches, widths = TABLE_MODELS, TABLE_BATCHES, TABLE_WIDTHS
    capacities = sorted({batch * width for batch in batches for width in widths})
    shapes = [
        (model, gemm, k, n, activation, capacity)
        for capacity in capacities
        for model, sizes in models
        for gemm, k, n, activation in model_gemms(*sizes)
    ]
    return device, dtype, shapes


def measure_table(path: str, *, smoke: bool, time_limit: float) -> Path:
    """Measure every shape of ``TABLE_MODELS`` (``SMOKE_TABLE_MODELS`` in float32 on the CPU under ``smoke``) until
    ``time_limit`` seconds have passed and write the table, merged with the shipped table's other devices."""
    from mp_kernels._triton.rows_linear import TABLE_PATH, device_traits, dtype_name

    device, dtype, shapes = table_setup(smoke)
    traits = device_traits(device)
    began = time.perf_counter()
    entries: list[dict[str, Any]] = []
    for model, gemm, k, n, activation, capacity in shapes:
        if time.perf_counter() - began > time_limit:
            break
        key = {"device": traits[1], "dtype": dtype_name(dtype), "k": k, "n": n, "capacity": capacity}
        measured = measure_shape(dtype, k, n, capacity, activation, device, traits)
        entries.append({**table_entry(key, measured), "model": model, "gemm": gemm})
        speedup = entries[-1]["speedup_vs_heuristic"]
        print(
            f"{model:9} {gemm:8} {capacity:5} x {k:4} -> {n:4}: {measured['best']:28} "
            f"{measured['median_ms'][measured['best']] * 1e3:8.1f} us, x{speedup or float('nan'):.2f} vs heuristic"
        )
    skipped = len(shapes) - len(entries)
    shipped = json.loads(TABLE_PATH.read_text())
    run = {**provenance(device), "sm_count": traits[0], "shapes_not_measured": skipped, "time_limit_s": time_limit}
    table = {
        "_schema": shipped["_schema"],
        "provenance": {**shipped["provenance"], traits[1]: run},
        "entries": [e for e in shipped["entries"] if e["device"] != traits[1]] + entries,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"measured {len(entries)} shapes ({skipped} left by the time limit); wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: time, print one line per record and write the JSON (or measure the plan table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, toy shapes")
    parser.add_argument("--table", help="measure rows_linear's plans instead and write the plan table here")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for --table (then it stops)")
    args = parser.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    if args.table:
        measure_table(args.table, smoke=args.smoke, time_limit=args.time_limit)
        return
    if not args.out:
        parser.error("--out is required unless --table is given")
    records, meta = run(args.smoke)
    print(f"peak {meta['peak_tflops']:.1f} TFLOP/s ({meta['peak_source']})")
    for r in records:
        shape = f"{r['op']:12} {r['shape']:8} {r['m']}x{r['k']}->{r['n']}"
        ok = r["status"] == "ok"
        print(f"{shape:40} " + (f"{r['median_ms']:.4f} ms {r['tflops']:.1f} TFLOP/s" if ok else r["status"]))
    print(f"wrote {write_results(args.out, records, meta)}")


if __name__ == "__main__":
    main()
