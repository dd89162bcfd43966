"""Benchmark of the GPU engine's kernels at its own shapes, each against the strongest plain-PyTorch way to do its job.

The engine (``mp_model.graph_engine``) runs, per bucket ``(batch B, width W)``, on a buffer of ``B * W`` rows:
``embed_pack``, then per layer ``rows_linear`` (QKV, feed-forward in), ``varlen_attention`` with
``prune_threshold`` (attention and the pruning plan in one pass), ``linear_add_layer_norm`` twice (attention output
with the plan's scatter, feed-forward output), ``exit_step`` and ``compact_tokens`` (dropping exited slots), and
``finish_slots`` last. ``rows_linear`` has its engine-shape benchmark in ``bench.gpu_gemm --table``; every other
kernel is timed here, on BERT-base and MiniLM at the buckets (1, 128), (8, 128) and (64, 512), in bfloat16, with
each slot's length drawn in ``(W / 2, W]`` (the range a width bucket holds). Methods, all on the same inputs:

* ``embed_pack``: ``mp`` against ``torch``, HF's ``BertEmbeddings`` on the padded batch, then boolean-mask packing;
* ``varlen_attention``: ``mp`` (with the plan, as the engine calls it) and ``mp_no_plan`` (attention alone) against
  ``torch``, padded attention in the model dtype (matmul, masked softmax in float32, matmul), the importance from
  the probabilities and the plan (``prune_plan_torch``);
* ``linear_add_layer_norm`` (``attention_output``: K = d, half the rows scattered by a plan; ``ffn_output``:
  K = d_ff): ``mp`` against ``torch``, ``F.linear`` + ``F.layer_norm(x + residual)`` + an ``index_copy_`` scatter;
* ``exit_step``, ``compact_tokens`` (a quarter of the slots dropped) and ``finish_slots``: ``mp`` against ``torch``,
  the kernel's PyTorch reference (``backend="torch"``: vectorised ATen, the CPU serving path).

A record (one per kernel, shape and method) holds the median, minimum and interquartile range in microseconds of
one call (``bench.timing.median_ms``: CUDA events, warm-up, many repeats, input sets rotated, each with its own
weights; host overhead included), ``vs_mp`` (its time / ``mp``'s), on ``mp`` ``speedup`` (the fastest other
method's time / ``mp``'s), the launches of one call (``launches``: Triton and ATen, ``bench.launches``) and the
Triton programs they start, and ``gbps`` (least bytes moved / time) or ``tflops`` (useful FLOPs / time). On a GPU,
``graph_us`` is one call's time replayed in a CUDA graph (``bench.gpu_gemm.graph_ms``: the engine's launch path)
for the methods that read nothing back (``Case.graphable``, else None), with ``graph_vs_mp`` and, on ``mp``,
``graph_speedup`` (each baseline at its best, in a graph where it can be captured, else eager / ``mp`` in a graph).

    python -m bench.bench_kernels                  # GPU: writes bench/results/kernels/kernels-<device>.json
    python -m bench.bench_kernels --smoke --out /tmp/kernels.json   # CPU, toy shapes, Triton interpreter (~20 s)
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch.nn.functional as F  # noqa: E402

import mp_kernels  # noqa: E402
from bench.gpu_gemm import graph_ms  # noqa: E402
from bench.launches import count_launches, record_launches  # noqa: E402
from bench.provenance import KERNELS_DIR, device_name, provenance, write_results  # noqa: E402
from bench.timing import median_ms  # noqa: E402
from mp_kernels.attention_reference import prune_plan_torch  # noqa: E402


class Model(NamedTuple):
    """The sizes of a BERT encoder that the kernels see."""

    hidden: int
    heads: int
    ffn: int
    layers: int
    vocab: int
    exit_width: int


MODELS = {
    "bert-base": Model(hidden=768, heads=12, ffn=3072, layers=12, vocab=30522, exit_width=128),
    "minilm": Model(hidden=384, heads=12, ffn=1536, layers=6, vocab=30522, exit_width=128),
}
SMOKE_MODELS = {"toy": Model(hidden=32, heads=2, ffn=64, layers=2, vocab=64, exit_width=16)}
BUCKETS = ((1, 128), (8, 128), (64, 512))
SMOKE_BUCKETS = ((1, 16), (2, 32))
KERNELS = ("embed_pack", "varlen_attention", "linear_add_layer_norm", "exit_step", "compact_tokens", "finish_slots")
POSITIONS, TYPES, CLASSES, EPS = 512, 2, 2, 1e-12
PRUNE_THRESHOLD = 1.0  # length-normalised: a token stays iff its importance exceeds 1 / n, about half of them
DROP_SHARE = 0.25  # slots that exited, dropped by compact_tokens
ROTATION_BYTES = 128 << 20  # input sets rotated per cell: enough to exceed the L2 cache, between 2 and 8 sets
Inputs = dict[str, Any]
Call = Callable[[Inputs], object]


class Case(NamedTuple):
    """One kernel at one shape: input sets to rotate, the methods, and the work of one call."""

    shape: str
    sets: list[Inputs]
    methods: dict[str, Call]
    metric: str  # "gbps" or "tflops"
    amount: float  # bytes or FLOPs of one call
    graphable: tuple[str, ...] = ("mp",)  # methods that read nothing back, so a CUDA graph can capture them


def _lengths(batch: int, width: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(width // 2 + 1, width + 1, (batch,), generator=generator)


def _randn(generator: torch.Generator, *shape: int, scale: float = 1.0, like: Inputs) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(device=like["device"], dtype=like["dtype"])


def _nbytes(value: object) -> int:
    """Bytes of a tensor, a module's parameters or a list of tensors (0 for anything else)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, torch.nn.Module):
        return sum(p.nbytes for p in value.parameters())
    return sum(_nbytes(v) for v in value) if isinstance(value, list) else 0


def _rotation(build: Callable[[int], Inputs]) -> list[Inputs]:
    """Input sets from seeds 0, 1, ... until together they hold ``ROTATION_BYTES`` (2 to 8 sets)."""
    sets = [build(0)]
    size = sum(_nbytes(v) for v in sets[0].values())
    count = min(8, max(2, math.ceil(ROTATION_BYTES / max(size, 1))))
    return sets + [build(seed) for seed in range(1, count)]


def embed_cases(model: Model, batch: int, width: int, base: Inputs) -> list[Case]:
    """``embed_pack`` against HF ``BertEmbeddings`` + boolean-mask packing."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    config = BertConfig(
        vocab_size=model.vocab, hidden_size=model.hidden, max_position_embeddings=POSITIONS, type_vocab_size=TYPES
    )
    lengths = _lengths(batch, width, torch.Generator().manual_seed(0))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(base["device"])

    def build(seed: int) -> Inputs:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        module = BertEmbeddings(config).to(device=base["device"], dtype=base["dtype"]).eval()
        ids = torch.randint(0, model.vocab, (batch, width), generator=generator).to(base["device"])
        types = torch.randint(0, TYPES, (batch, width), generator=generator).to(base["device"])
        return {"module": module, "ids": ids, "types": types, "mask": mask.long()}

    def mp(x: Inputs) -> object:
        e = x["module"]
        tables = (e.word_embeddings.weight, e.position_embeddings.weight, e.token_type_embeddings.weight)
        args = (x["ids"], x["types"], x["mask"], *tables, e.LayerNorm.weight, e.LayerNorm.bias, EPS)
        return mp_kernels.embed_pack(*args, backend=base["backend"], validate=False)

    def torch_way(x: Inputs) -> object:
        keep = x["mask"].bool()
        hidden = x["module"](input_ids=x["ids"], token_type_ids=x["types"])[keep]
        counts = keep.sum(1)
        return hidden, F.pad(counts.cumsum(0), (1, 0)).int(), counts, counts > 0

    tokens, item = int(lengths.sum()), base["dtype"].itemsize
    amount = 3 * tokens * model.hidden * item + batch * width * 3 * 8  # word, position rows, output; ids, types, mask
    return [Case("embed", _rotation(build), {"mp": mp, "torch": torch_way}, "gbps", amount)]


def padded_attention_plan(
    qkv: torch.Tensor, cu: torch.Tensor, width: int, threshold: torch.Tensor, alive: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """Attention, importance and pruning plan in plain PyTorch on the padded ``(B, heads, W, head_dim)`` batch."""
    capacity, _, heads, head_dim = qkv.shape
    batch = cu.numel() - 1
    starts, lengths = cu[:-1].long(), cu.diff().long()
    position = torch.arange(width, device=qkv.device)
    valid = position[None, :] < lengths[:, None]
    rows = starts[:, None] + torch.minimum(position[None, :], (lengths[:, None] - 1).clamp(min=0))
    q, k, v = qkv[rows].permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, W, head_dim)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * head_dim**-0.5
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    out = torch.matmul(probs.to(qkv.dtype), v).transpose(1, 2)  # (B, W, heads, head_dim)
    received = (probs * valid[:, None, :, None]).sum(dim=(1, 2))  # (B, W): attention each key receives
    importance = torch.zeros(capacity + 1, device=qkv.device)
    target = torch.where(valid, rows, capacity).flatten()
    importance.index_copy_(0, target, (received / (heads * lengths.clamp(min=1)[:, None])).flatten())
    packed = qkv.new_empty(capacity + 1, heads, head_dim).index_copy_(0, target, out.reshape(batch * width, heads, -1))
    plan = prune_plan_torch(importance[:capacity], cu, threshold, True, alive, counts)
    return packed[:capacity], plan


def attention_cases(model: Model, batch: int, width: int, base: Inputs) -> list[Case]:
    """``varlen_attention`` with the pruning plan, without it, and padded PyTorch attention with the plan."""
    heads, head_dim = model.heads, model.hidden // model.heads
    lengths = _lengths(batch, width, torch.Generator().manual_seed(0))
    device, backend = base["device"], base["backend"]
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)

    def build(seed: int) -> Inputs:
        qkv = _randn(torch.Generator().manual_seed(seed), batch * width, 3, heads, head_dim, like=base)
        return {"qkv": qkv, "cu": cu, "alive": torch.ones(batch, dtype=torch.bool, device=device)}

    threshold = torch.full((1,), PRUNE_THRESHOLD, device=device)
    counts = torch.zeros(batch, dtype=torch.int64, device=device)

    def mp(x: Inputs) -> object:
        q, k, v = x["qkv"].unbind(1)
        plan = dict(prune_threshold=threshold, keep_first=True, alive=x["alive"], counts=counts)
        return mp_kernels.varlen_attention(q, k, v, x["cu"], width, **plan, backend=backend, validate=False)

    def mp_no_plan(x: Inputs) -> object:
        q, k, v = x["qkv"].unbind(1)
        return mp_kernels.varlen_attention(q, k, v, x["cu"], width, backend=backend, validate=False)

    def torch_way(x: Inputs) -> object:
        return padded_attention_plan(x["qkv"], x["cu"], width, threshold, x["alive"], counts)

    flops = 4 * int((lengths**2).sum()) * heads * head_dim
    methods = {"mp": mp, "mp_no_plan": mp_no_plan, "torch": torch_way}
    return [Case("attention_plan", _rotation(build), methods, "tflops", flops, ("mp", "mp_no_plan"))]


def scatter_linear_add_layer_norm(x: Inputs) -> torch.Tensor:
    """``linear_add_layer_norm`` in plain PyTorch on the whole buffer: cuBLAS, add and LayerNorm, then the rows
    scattered to their destinations (dead rows and ``dest = -1`` to a spare row), with no host read."""
    y = F.linear(x["x"], x["weight"], x["bias"]) + x["residual"]
    y = F.layer_norm(y, (y.shape[1],), x["norm_weight"], x["norm_bias"], EPS)
    if x["dest"] is None:
        return y
    capacity = y.shape[0]
    live = torch.arange(capacity, device=y.device) < x["n_rows"]
    target = torch.where(live & (x["dest"] >= 0), x["dest"].long(), capacity)
    return y.new_empty(capacity + 1, y.shape[1]).index_copy_(0, target, y)[:capacity]


def linear_cases(model: Model, batch: int, width: int, base: Inputs) -> list[Case]:
    """``linear_add_layer_norm`` at the attention output (scattered by a plan) and at the feed-forward output."""
    lengths = _lengths(batch, width, torch.Generator().manual_seed(0))
    capacity, device, d = batch * width, base["device"], model.hidden
    live = int(lengths.sum())
    keep = torch.rand(live, generator=torch.Generator().manual_seed(1)) < 0.5
    dest = torch.full((capacity,), -1, dtype=torch.int32)
    dest[:live] = torch.where(keep, keep.int().cumsum(0, dtype=torch.int32) - 1, -1)
    cases = []
    for shape, k, scatter in (("attention_output", d, True), ("ffn_output", model.ffn, False)):

        def build(seed: int, k: int = k, scatter: bool = scatter) -> Inputs:
            generator = torch.Generator().manual_seed(seed)
            return {
                "x": _randn(generator, capacity, k, like=base),
                "weight": _randn(generator, d, k, scale=k**-0.5, like=base),
                "bias": _randn(generator, d, scale=0.1, like=base),
                "residual": _randn(generator, capacity, d, like=base),
                "norm_weight": _randn(generator, d, like=base),
                "norm_bias": _randn(generator, d, like=base),
                "n_rows": torch.tensor([live], dtype=torch.int32, device=device),
                "dest": dest.to(device) if scatter else None,
            }

        def mp(x: Inputs) -> object:
            args = (x["x"], x["weight"], x["bias"], x["residual"], x["norm_weight"], x["norm_bias"], EPS, x["n_rows"])
            return mp_kernels.linear_add_layer_norm(*args, dest=x["dest"], backend=base["backend"])

        methods = {"mp": mp, "torch": scatter_linear_add_layer_norm}
        cases.append(Case(shape, _rotation(build), methods, "tflops", 2 * live * k * d, ("mp", "torch")))
    return cases


def slot_state(model: Model, batch: int, width: int, base: Inputs, seed: int) -> Inputs:
    """A packed buffer after a layer: hidden rows, ``cu``, every slot alive, the exit records."""
    generator = torch.Generator().manual_seed(seed)
    lengths = _lengths(batch, width, torch.Generator().manual_seed(0))
    device = base["device"]
    return {
        "hidden": _randn(generator, batch * width, model.hidden, like=base),
        "cu": F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        "lengths": lengths.to(device),
        "alive": torch.ones(batch, dtype=torch.bool, device=device),
        "logits": torch.zeros(batch, CLASSES, device=device, dtype=base["dtype"]),
        "exit_layer": torch.zeros(batch, dtype=torch.int64, device=device),
    }


def exit_cases(model: Model, batch: int, width: int, base: Inputs) -> list[Case]:
    """``exit_step`` against its reference; ``tau`` 0 keeps every slot alive, so every call does the same work."""
    tau = torch.zeros(1, device=base["device"])

    def build(seed: int) -> Inputs:
        x = slot_state(model, batch, width, base, seed)
        generator = torch.Generator().manual_seed(seed + 1000)
        shapes = ((model.exit_width, model.hidden), (model.exit_width,), (CLASSES, model.exit_width), (CLASSES,))
        x["head"] = [_randn(generator, *shape, scale=0.05, like=base) for shape in shapes]
        return x

    def call(backend: str) -> Call:
        def run(x: Inputs) -> None:
            outputs = (x["logits"], x["exit_layer"], x["alive"])
            mp_kernels.exit_step(x["hidden"], x["cu"], *x["head"], tau, 3, *outputs, max_seqlen=width, backend=backend)

        return run

    sets = _rotation(build)
    tokens, item = int(sets[0]["cu"][-1]), base["dtype"].itemsize
    amount = (tokens * model.hidden + model.exit_width * (model.hidden + CLASSES)) * item
    return [Case("exit", sets, {"mp": call(base["backend"]), "torch": call("torch")}, "gbps", amount)]


def compact_cases(model: Model, batch: int, width: int, base: Inputs) -> list[Case]:
    """``compact_tokens`` dropping the exited slots (as the engine does after ``exit_step``) against its reference."""
    dropped = torch.rand(batch, generator=torch.Generator().manual_seed(2)) < DROP_SHARE
    dropped[0] = batch > 1  # at least one slot goes and one stays where the batch has two

    def build(seed: int) -> Inputs:
        x = slot_state(model, batch, width, base, seed)
        x["alive"] = (~dropped).to(base["device"])
        return x

    def call(backend: str) -> Call:
        return lambda x: mp_kernels.compact_tokens(
            x["hidden"], x["cu"], width, alive=x["alive"], backend=backend, validate=False
        )

    sets = _rotation(build)
    lengths = _lengths(batch, width, torch.Generator().manual_seed(0))
    amount = 2 * int(lengths[~dropped].sum()) * model.hidden * base["dtype"].itemsize
    return [Case("drop", sets, {"mp": call(base["backend"]), "torch": call("torch")}, "gbps", amount)]


def finish_cases(model: Model, batch: int, width: int, base: Inputs) -> list[Case]:
    """``finish_slots`` (pooler, classifier, exit records, kept counts, FLOPs) against its reference."""
    from transformers import BertConfig

    from mp_model.flops import flops_coefficients

    sizes = dict(hidden_size=model.hidden, num_attention_heads=model.heads, intermediate_size=model.ffn)
    coefficients = flops_coefficients(BertConfig(**sizes, num_hidden_layers=model.layers))
    prunes = tuple(i % 2 == 0 for i in range(model.layers))

    def build(seed: int) -> Inputs:
        x = slot_state(model, batch, width, base, seed)
        generator = torch.Generator().manual_seed(seed + 2000)
        d = model.hidden
        shapes = ((d, d), (d,), (CLASSES, d), (CLASSES,))
        x["head"] = [_randn(generator, *shape, scale=0.05, like=base) for shape in shapes]
        x["kept"] = x["lengths"].expand(model.layers, batch).contiguous()
        x["flops"] = torch.zeros(batch, dtype=torch.int64, device=base["device"])
        return x

    def call(backend: str) -> Call:
        def run(x: Inputs) -> None:
            outputs = (x["logits"], x["exit_layer"], x["kept"], x["flops"])
            args = (x["hidden"], x["cu"], *x["head"], x["alive"], x["lengths"], *outputs, prunes, coefficients)
            mp_kernels.finish_slots(*args, early_exit=True, backend=backend)

        return run

    d, item = model.hidden, base["dtype"].itemsize
    amount = (batch * d + d * d + CLASSES * d) * item
    methods = {"mp": call(base["backend"]), "torch": call("torch")}
    return [Case("finish", _rotation(build), methods, "gbps", amount, ("mp", "torch"))]


CASES: dict[str, Callable[[Model, int, int, Inputs], list[Case]]] = {
    "embed_pack": embed_cases,
    "varlen_attention": attention_cases,
    "linear_add_layer_norm": linear_cases,
    "exit_step": exit_cases,
    "compact_tokens": compact_cases,
    "finish_slots": finish_cases,
}


def launches(call: Call, inputs: Inputs) -> dict[str, int | None]:
    """Kernel launches of one call (Triton and ATen) and the Triton programs they start."""
    with record_launches() as calls:
        call(inputs)
    counts = count_launches(calls)
    grids = [call[1] for call in calls if not call[0].startswith("aten.")]
    sized = all(isinstance(g, int) for grid in grids for g in grid)
    programs = sum(math.prod(grid) for grid in grids) if sized else None
    return {"launches": counts["total"], "triton_launches": counts["triton"], "programs": programs}


def time_case(case: Case, device: torch.device, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """One record per method of ``case``: times in microseconds, launches, throughput and ratios to ``mp``."""
    records = []
    for method, call in case.methods.items():
        timing = median_ms(call, case.sets, device=device, warmup=warmup, repeats=repeats)
        median_us = 1e3 * timing["median_ms"]
        record = {"shape": case.shape, "method": method, "median_us": median_us}
        record |= {"min_us": 1e3 * timing["min_ms"], "iqr_us": 1e3 * timing["iqr_ms"], **launches(call, case.sets[0])}
        scale = 1e3 if case.metric == "gbps" else 1e6  # bytes/us -> GB/s, FLOPs/us -> TFLOP/s
        record[case.metric] = case.amount / median_us / scale
        record["graph_us"] = None
        if device.type == "cuda" and method in case.graphable:
            try:
                record["graph_us"] = 1e3 * graph_ms(call, case.sets, device)
            except RuntimeError as error:  # a capture that fails is recorded, and the benchmark goes on
                record["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        records.append(record)
    mp, mp_graph = records[0]["median_us"], records[0]["graph_us"]
    for record in records:
        record["vs_mp"] = record["median_us"] / mp
        both = mp_graph is not None and record["graph_us"] is not None
        record["graph_vs_mp"] = record["graph_us"] / mp_graph if both else None
    others = records[1:]
    records[0]["speedup"] = min(r["median_us"] for r in others) / mp
    if mp_graph is not None:  # each baseline at its best: in a CUDA graph where it can be captured
        records[0]["graph_speedup"] = min(r["graph_us"] or r["median_us"] for r in others) / mp_graph
    return records


def run(
    models: dict[str, Model],
    buckets: tuple[tuple[int, int], ...],
    kernels: tuple[str, ...],
    base: Inputs,
    warmup: int,
    repeats: int,
    deadline: float = math.inf,
    write: Callable[[list[dict[str, Any]], list[str]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Time every kernel at every model and bucket; returns the records and the cells skipped past ``deadline``
    (``time.monotonic()``), calling ``write(records, skipped)`` after each cell."""
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    for kernel in kernels:
        for name, model in models.items():
            for batch, width in buckets:
                cell = {"kernel": kernel, "model": name, "batch": batch, "width": width}
                if time.monotonic() > deadline:
                    skipped.append(f"{kernel}/{name}/b{batch}w{width}")
                    continue
                with torch.inference_mode():
                    for case in CASES[kernel](model, batch, width, base):
                        for record in time_case(case, base["device"], warmup, repeats):
                            records.append({**cell, "dtype": str(base["dtype"]).removeprefix("torch."), **record})
                            print(summary_line(records[-1]), flush=True)
                if write is not None:
                    write(records, skipped)
    return records, skipped


def summary_line(record: dict[str, Any]) -> str:
    """One line: kernel, model, bucket, method, median microseconds, ratio to ``mp``, launches and throughput."""
    rate = f"{record['gbps']:8.1f} GB/s" if "gbps" in record else f"{record['tflops']:8.2f} TFLOP/s"
    where = f"{record['kernel']:22} {record['model']:9} b{record['batch']:<3} w{record['width']:<4}"
    where += f" {record['shape']:17}"
    return (
        f"{where} {record['method']:11} {record['median_us']:10.1f} us  x{record['vs_mp']:7.3f} of mp  "
        f"{record['launches']:3} launches  {rate}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file (default bench/results/kernels/kernels-<device>.json)")
    parser.add_argument("--smoke", action="store_true", help="toy shapes on the CPU, Triton interpreter, float32")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 200; smoke 2)")
    parser.add_argument("--time-limit", type=float, default=math.inf, help="start no new cell after this many s")
    args = parser.parse_args(argv)
    args.kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    if unknown := sorted(set(args.kernels) - set(KERNELS)):
        parser.error(f"--kernels: unknown {unknown}, choose from {', '.join(KERNELS)}")
    known = SMOKE_MODELS if args.smoke else MODELS
    names = args.models.split(",") if args.models else list(known)
    if unknown := sorted(set(names) - set(known)):
        parser.error(f"--models: unknown {unknown}, choose from {', '.join(known)}")
    args.models = {name: known[name] for name in names}
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON with provenance."""
    begin = time.monotonic()
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
        device, dtype, buckets, warmup, repeats = torch.device("cpu"), torch.float32, SMOKE_BUCKETS, 1, 2
    elif torch.cuda.is_available():
        device, dtype, buckets, warmup, repeats = torch.device("cuda"), torch.bfloat16, BUCKETS, 10, 200
    else:
        raise SystemExit("no CUDA device: run with --smoke for the CPU plumbing check")
    repeats = args.repeats or repeats
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    out = args.out or KERNELS_DIR / f"kernels-{slug}.json"
    meta = {**provenance(device), "benchmark": "kernels", "dtype": str(dtype).removeprefix("torch.")}
    meta |= {"models": {name: model._asdict() for name, model in args.models.items()}, "buckets": buckets}
    meta |= {"warmup": warmup, "repeats": repeats, "mode": "smoke" if args.smoke else "gpu", "lengths": "(W / 2, W]"}
    meta["prune_threshold"] = PRUNE_THRESHOLD

    def write(records: list[dict[str, Any]], skipped: list[str]) -> None:
        write_results(out, records, {**meta, "skipped_time_limit": skipped})

    base = {"device": device, "dtype": dtype, "backend": "triton"}
    deadline = begin + args.time_limit
    records, skipped = run(args.models, buckets, args.kernels, base, warmup, repeats, deadline, write)
    write(records, skipped)
    print(f"wrote {out}: {len(records)} records" + (f", {len(skipped)} cells skipped (time limit)" if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
