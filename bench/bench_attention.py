"""Microbenchmarks of ``varlen_attention`` against SDPA's backends, flash-attn and eager attention.

Ours and flash-attn's varlen kernel run on the packed batch (only real tokens); the other baselines run on the
padded equivalent ``(batch, heads, L, head_dim)`` with a key-padding mask where lengths differ (an SDPA backend
that takes no mask is recorded as unsupported on such batches). The importance baseline is what
Learned Token Pruning does: eager attention (transformers' BERT ``eager_attention_forward``), then the mean of
the probabilities over heads and valid query rows. Only the attention call is timed (packing and padding are
prepared beforehand). TFLOP/s counts useful work only, ``4 * sum_b n_b^2 * heads * head_dim``, so padded
baselines pay for their padding.

pytest-benchmark::

    python -m pytest bench/bench_attention.py --benchmark-only   # GPU shapes need CUDA; CPU shape always runs

Plain script (JSON with provenance; ``--cpu-small`` for a CPU run in float32 at a small size)::

    python -m bench.bench_attention --out bench/results/kernels/attention-$(hostname).json
    python -m bench.bench_attention --cpu-small --threads 1 --out /tmp/attention-cpu.json

On the CPU ours is the PyTorch backend, compared with eager attention and SDPA's CPU kernels.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.bert.modeling_bert import eager_attention_forward

from bench.provenance import KERNELS_DIR, provenance, write_results
from bench.timing import median_ms
from mp_kernels import varlen_attention

ON_GPU = torch.cuda.is_available()
GPU_DTYPES = (torch.float16, torch.bfloat16)
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
CPU_SDPA_BACKENDS = ("flash", "math")
ROTATION_BYTES = 256 << 20


@dataclass(frozen=True)
class Shape:
    """A batch of sequences: ``lengths`` (batch,), heads and head_dim."""

    name: str
    lengths: tuple[int, ...]
    heads: int
    head_dim: int

    @property
    def flops(self) -> int:
        """Useful floating-point operations: the QK^T and PV products of every sequence, 2 per multiply-add."""
        return 4 * sum(n * n for n in self.lengths) * self.heads * self.head_dim


def mixed_lengths(batch: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    """``batch`` lengths drawn uniformly from ``[low, high]`` with a fixed seed."""
    rng = random.Random(seed)
    return tuple(rng.randint(low, high) for _ in range(batch))


GPU_SHAPES = [
    *(Shape(f"b64-n{n}", (n,) * 64, 12, 64) for n in (128, 256, 512)),
    Shape("b64-mixed16-512", mixed_lengths(64, 16, 512, seed=0), 12, 64),
]
CPU_SHAPES = [
    Shape("b32-mixed16-128", mixed_lengths(32, 16, 128, seed=0), 12, 32),
    Shape("b32-n128", (128,) * 32, 12, 32),
]


@dataclass
class Inputs:
    """One batch in both layouts.

    Packed ``q``/``k``/``v`` ``(total, heads, head_dim)``, ``cu_seqlens`` int32 ``(batch + 1,)``; padded
    ``qp``/``kp``/``vp`` ``(batch, heads, L, head_dim)`` (views of ``(batch, L, heads, head_dim)`` as
    transformers holds them); ``keys`` bool ``(batch, L)`` True at real tokens; ``bool_mask`` ``(batch, 1, 1, L)``
    (None when no token is padding) and ``additive_mask`` ``(batch, 1, 1, L)`` in the input dtype for eager.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    qp: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    keys: torch.Tensor
    lengths: torch.Tensor
    bool_mask: torch.Tensor | None
    additive_mask: torch.Tensor | None


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    """Random inputs for ``shape`` on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batch, length = len(shape.lengths), max(shape.lengths)
    lengths = torch.tensor(shape.lengths, device=device)
    keys = torch.arange(length, device=device)[None, :] < lengths[:, None]
    padded = [
        torch.randn(batch, length, shape.heads, shape.head_dim, generator=generator, device=device, dtype=dtype)
        for _ in range(3)
    ]
    q, k, v = (x[keys] for x in padded)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    padding = not bool(keys.all())
    bool_mask = keys[:, None, None, :] if padding else None
    additive_mask = None
    if padding:
        additive_mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
        additive_mask.masked_fill_(~bool_mask, torch.finfo(dtype).min)
    qp, kp, vp = (x.transpose(1, 2) for x in padded)
    return Inputs(q, k, v, cu_seqlens, length, qp, kp, vp, keys, lengths, bool_mask, additive_mask)


Result = tuple[torch.Tensor, torch.Tensor | None]
EAGER_MODULE = torch.nn.Module().eval()


def run_ours(x: Inputs, importance: bool) -> Result:
    """``varlen_attention`` on the packed batch: Triton on CUDA, the PyTorch backend on the CPU."""
    backend = "triton" if x.q.is_cuda else "torch"
    result = varlen_attention(
        x.q, x.k, x.v, x.cu_seqlens, x.max_seqlen, return_importance=importance, backend=backend, validate=False
    )
    return result if importance else (result, None)


def run_sdpa(x: Inputs, backend: SDPBackend) -> Result:
    """``scaled_dot_product_attention`` restricted to one backend; out ``(batch, L, heads, head_dim)``."""
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(x.qp, x.kp, x.vp, attn_mask=x.bool_mask)
    return out.transpose(1, 2), None


def run_flash_attn_varlen(x: Inputs) -> Result:
    """flash-attn's own varlen kernel on the packed batch."""
    from flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(x.q, x.k, x.v, x.cu_seqlens, x.cu_seqlens, x.max_seqlen, x.max_seqlen)
    return out, None


def run_eager(x: Inputs, importance: bool) -> Result:
    """transformers' eager BERT attention; with ``importance`` also LTP's masked mean of the probabilities."""
    out, probs = eager_attention_forward(EAGER_MODULE, x.qp, x.kp, x.vp, x.additive_mask)
    if not importance:
        return out, None
    received = (probs * x.keys[:, None, :, None]).sum(dim=(1, 2), dtype=torch.float32)
    return out, received / (x.qp.shape[1] * x.lengths[:, None])


@dataclass(frozen=True)
class Method:
    """A benchmarked implementation; ``ours`` marks varlen_attention, ``importance`` that it returns it."""

    name: str
    run: Callable[[Inputs], Result]
    importance: bool
    ours: bool


def methods(device: torch.device) -> list[Method]:
    """Every implementation that can be tried on ``device``.

    One that cannot run (flash-attn not installed, an SDPA backend without a kernel for these inputs) raises
    when called and is recorded as unsupported.
    """
    found = [
        Method("mp", lambda x: run_ours(x, False), False, True),
        Method("mp+importance", lambda x: run_ours(x, True), True, True),
        Method("eager", lambda x: run_eager(x, False), False, False),
        Method("eager+importance", lambda x: run_eager(x, True), True, False),
    ]
    backends = SDPA_BACKENDS if device.type == "cuda" else {n: SDPA_BACKENDS[n] for n in CPU_SDPA_BACKENDS}
    found += [Method(f"sdpa-{name}", lambda x, b=b: run_sdpa(x, b), False, False) for name, b in backends.items()]
    if device.type == "cuda":
        found.append(Method("flash-attn-varlen", run_flash_attn_varlen, False, False))
    return found


def packed(result: Result, x: Inputs) -> Result:
    """A method's result in the packed layout: out ``(total, heads, head_dim)``, importance ``(total,)``."""
    out, importance = result
    if out.dim() == 4:
        out = out[x.keys]
    if importance is not None and importance.dim() == 2:
        importance = importance[x.keys]
    return out, importance


def rotation(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[Inputs]:
    """Enough input sets that cycling through them defeats the caches (2 to 6 sets)."""
    per_set = 6 * len(shape.lengths) * max(shape.lengths) * shape.heads * shape.head_dim * dtype.itemsize
    count = min(6, max(2, math.ceil(ROTATION_BYTES / per_set))) if device.type == "cuda" else 2
    return [make_inputs(shape, dtype, device, seed) for seed in range(count)]


def benchmark_shape(shape: Shape, dtype: torch.dtype, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Time every method on one shape and dtype; one record per method, with ratios to the best baseline."""
    inputs = rotation(shape, dtype, device)
    expected_out, expected_importance = packed(run_ours(inputs[0], True), inputs[0])
    records = []
    for method in methods(device):
        record: dict[str, Any] = {
            "shape": shape.name,
            "batch": len(shape.lengths),
            "heads": shape.heads,
            "head_dim": shape.head_dim,
            "max_seqlen": max(shape.lengths),
            "total_tokens": sum(shape.lengths),
            "lengths": list(shape.lengths),
            "dtype": str(dtype).removeprefix("torch."),
            "method": method.name,
            "importance": method.importance,
            "ours": method.ours,
        }
        try:
            out, importance = packed(method.run(inputs[0]), inputs[0])
        except (RuntimeError, NotImplementedError, ImportError) as error:
            records.append({**record, "status": "unsupported: " + str(error).strip().splitlines()[0][:200]})
            continue
        record["max_abs_diff_out_vs_mp"] = float((out.float() - expected_out.float()).abs().max())
        if importance is not None:
            record["max_abs_diff_importance_vs_mp"] = float((importance.float() - expected_importance).abs().max())
        timing = median_ms(method.run, inputs, device=device, warmup=3 if device.type == "cuda" else 2, repeats=repeats)
        records.append({**record, **timing, "status": "ok", "tflops": shape.flops / (timing["median_ms"] * 1e9)})
    add_ratios(records)
    return records


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Add speedups (other time / this time) to the timed records.

    ``speedup_vs_best_baseline``: against the fastest method that is not ours; for methods that return
    importance also ``speedup_vs_best_importance_baseline``; for ours ``speedup_vs_eager``: against eager
    attention with the same ``importance`` (what a transformers model with LTP runs).
    """
    timed = [r for r in records if r["status"] == "ok"]
    baselines = [r for r in timed if not r["ours"]]
    for key, pool, applies in (
        ("best_baseline", baselines, lambda r: True),
        ("best_importance_baseline", [r for r in baselines if r["importance"]], lambda r: r["importance"]),
    ):
        if not pool:
            continue
        best = min(pool, key=lambda r: r["median_ms"])
        for r in filter(applies, timed):
            r[key] = best["method"]
            r["speedup_vs_" + key] = best["median_ms"] / r["median_ms"]
    eager = {r["importance"]: r for r in baselines if r["method"].startswith("eager")}
    for r in timed:
        if r["ours"] and r["importance"] in eager:
            r["speedup_vs_eager"] = eager[r["importance"]]["median_ms"] / r["median_ms"]


def run_all(cpu_small: bool, repeats: int) -> tuple[list[dict[str, Any]], torch.device]:
    """Every shape and dtype of the chosen mode: the GPU sizes in fp16 and bf16, or the CPU sizes in fp32."""
    if cpu_small:
        device, shapes, dtypes = torch.device("cpu"), CPU_SHAPES, (torch.float32,)
    else:
        if not ON_GPU:
            raise SystemExit("no CUDA device: run with --cpu-small for the CPU comparison")
        device, shapes, dtypes = torch.device("cuda"), GPU_SHAPES, GPU_DTYPES
    records = []
    for shape in shapes:
        for dtype in dtypes:
            records += benchmark_shape(shape, dtype, device, repeats)
    return records, device


def summary(records: list[dict[str, Any]]) -> str:
    """One line per record: shape, dtype, method, median ms, TFLOP/s and speedups (nan where not defined)."""
    columns = ("speedup_vs_best_baseline", "speedup_vs_best_importance_baseline", "speedup_vs_eager")
    header = " ".join(f"{name:>8}" for name in ("TFLOP/s", "vs best", "vs imp.", "vs eager"))
    lines = [f"{'shape':18} {'dtype':9} {'method':20} {'ms':>9} {header}"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['shape']:18} {r['dtype']:9} {r['method']:20} {r['status'][:60]}")
            continue
        speedups = " ".join(f"{r.get(c, math.nan):8.2f}" for c in columns)
        lines.append(
            f"{r['shape']:18} {r['dtype']:9} {r['method']:20} {r['median_ms']:9.3f} {r['tflops']:8.3f} {speedups}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: benchmark, print a table and write ``{"provenance", "records"}`` JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/kernels/attention-<mode>.json)")
    parser.add_argument("--cpu-small", action="store_true", help="CPU, float32, small shapes, PyTorch backend")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 50 GPU, 10 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if args.cpu_small else 50)
    records, device = run_all(args.cpu_small, repeats)
    print(summary(records))
    out = args.out or KERNELS_DIR / f"attention-{'cpu-small' if args.cpu_small else 'gpu'}.json"
    meta = {**provenance(device), "timed": "attention call only; padded baselines on (batch, heads, L, head_dim)"}
    print(f"wrote {write_results(out, records, meta)}")


def _cases() -> list[Any]:
    """pytest parameters (shape, dtype, method name) for every mode, marked to skip where unavailable."""
    cases = []
    for shapes, dtypes, device in ((GPU_SHAPES, GPU_DTYPES, "cuda"), (CPU_SHAPES[:1], (torch.float32,), "cpu")):
        names = [m.name for m in methods(torch.device(device))]
        for shape in shapes:
            for dtype in dtypes:
                for name in names:
                    marks = [pytest.mark.skipif(device == "cuda" and not ON_GPU, reason="needs CUDA")]
                    case_id = f"{device}-{shape.name}-{str(dtype).removeprefix('torch.')}-{name}"
                    cases.append(pytest.param(shape, dtype, torch.device(device), name, id=case_id, marks=marks))
    return cases


@pytest.mark.parametrize(("shape", "dtype", "device", "name"), _cases())
def test_attention(benchmark: Any, shape: Shape, dtype: torch.dtype, device: torch.device, name: str) -> None:
    if name == "flash-attn-varlen":
        pytest.importorskip("flash_attn")
    method = next(m for m in methods(device) if m.name == name)
    x = make_inputs(shape, dtype, device, seed=0)
    try:
        method.run(x)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"{name} does not run these inputs: {str(error).strip().splitlines()[0][:120]}")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def call() -> None:
        method.run(x)
        synchronize()

    benchmark.extra_info.update(shape=shape.name, dtype=str(dtype), flops=shape.flops)
    benchmark(call)


if __name__ == "__main__":
    main()
