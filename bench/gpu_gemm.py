"""GEMM check: ``torch.nn.functional.linear`` (cuBLAS) and ``mp_kernels.rows_linear`` at BERT-base feed-forward shapes.

Times ``linear`` in bfloat16 at the two feed-forward GEMMs of BERT-base on 8192 tokens (8192 x 768 -> 3072 and
8192 x 3072 -> 768, with bias) and, when ``mp_kernels.rows_linear`` exists, the same shapes through it with every
row live (``n_rows`` holding 8192). Each record gives TFLOP/s (``2 * m * k * n`` per call) and its fraction of the
device's dense bfloat16 peak: the datasheet figure for a device whose name contains a key of ``PEAK_TFLOPS``, else
the cuBLAS figure measured at 8192 x 8192 x 8192 (recorded in every run). Writes ``{"provenance", "records"}`` JSON.

    python -m bench.gpu_gemm --out bench/results/gemm-$(hostname).json
    python -m bench.gpu_gemm --smoke --out /tmp/gemm.json    # CPU, float32, toy shapes (plumbing only)

Under ``--smoke`` ``rows_linear`` runs its default backend (Triton under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
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


def main(argv: list[str] | None = None) -> None:
    """Command line: time, print one line per record and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, toy shapes")
    args = parser.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    records, meta = run(args.smoke)
    print(f"peak {meta['peak_tflops']:.1f} TFLOP/s ({meta['peak_source']})")
    for r in records:
        shape = f"{r['op']:12} {r['shape']:8} {r['m']}x{r['k']}->{r['n']}"
        ok = r["status"] == "ok"
        print(f"{shape:40} " + (f"{r['median_ms']:.4f} ms {r['tflops']:.1f} TFLOP/s" if ok else r["status"]))
    print(f"wrote {write_results(args.out, records, meta)}")


if __name__ == "__main__":
    main()
