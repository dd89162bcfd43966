"""Benchmark of the compaction kernels against eager PyTorch and against one BERT layer at the same token count.

Per packed batch (``tokens`` in 8k..128k, ``d`` in 384 and 768, BERT-like lengths) it times, as a model runs them
after a layer: ``prune_tokens`` (about half the tokens kept), ``entropy_exit`` on ``(batch, 2)`` logits,
``scatter_rows`` of the exiting logits and exit layers, and ``drop_sequences`` (a quarter of the sequences
leave). Each is compared with the obvious eager PyTorch code (boolean masks, ``nonzero``, ``cumsum``,
``index_select``, ``.item()``), and their sum with one BERT encoder layer (transformers' ``BertLayer``, SDPA
attention, width ``d``, 12 heads, feed-forward ``4 d``) on the same tokens as ``tokens / layer_seqlen`` full
sequences. Targets on a GPU: each kernel at least 3x faster than eager, all of them under 5% of the layer.

It also times the variant the GPU engine (``mp_model.graph_engine``) runs after a layer, on the same batch in a
fixed-capacity buffer with sizes in device memory and no read-back: ``compact_tokens`` pruning, ``exit_step``
(segment mean, a 128-wide sub-classifier, entropy test and exit records, one launch) and ``compact_tokens``
dropping the exited sequences; their sum is ``engine_total_ms`` and ``engine_share_of_layer``.

Two ways to run it:

* ``pytest bench/bench_compaction.py`` (pytest-benchmark, CUDA only: skipped without a GPU);
* ``python -m bench.bench_compaction [--out FILE]`` times everything in one run and writes JSON with provenance;
  ``--cpu-small`` runs small sizes on the CPU (PyTorch backend against eager) in under a minute, on one thread
  unless ``--threads`` says otherwise (several threads on a busy machine time the waits, not the work).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import mp_kernels
from bench.provenance import provenance, write_results
from bench.timing import median_ms

TOKENS = (8192, 32768, 131072)
WIDTHS = (384, 768)
CPU_SMALL_TOKENS = (1024, 4096)
MIN_LENGTH, MAX_LENGTH = 32, 512
CLASSES = 2
TAU = 0.5
DROP_SHARE = 0.25
LAYER_SEQLEN = 128
HEADS = 12
OPS = ("prune_tokens", "entropy_exit", "scatter_rows", "drop_sequences")
ENGINE_OPS = ("compact_prune", "exit_step", "compact_drop")
EXIT_WIDTH = 128


@dataclass
class Batch:
    """One packed batch and everything the compaction calls read."""

    hidden: torch.Tensor
    importance: torch.Tensor
    cu_seqlens: torch.Tensor
    threshold: torch.Tensor
    logits: torch.Tensor
    keep: torch.Tensor
    seq_index: torch.Tensor
    logits_out: torch.Tensor
    exit_layer: torch.Tensor
    layer_index: torch.Tensor


def make_batch(tokens: int, width: int, dtype: torch.dtype, device: torch.device, seed: int) -> Batch:
    """BERT-like lengths in [32, 512] summing to ``tokens``; importance uniform in [0, 2 / n] per sequence of
    length ``n`` against a threshold of ``1 / n`` (about half kept); a quarter of the sequences exit."""
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - tokens
    batch = len(lengths)
    length = torch.tensor(lengths)
    cu_seqlens = F.pad(length.cumsum(0), (1, 0)).to(torch.int32)
    per_token = torch.repeat_interleave(length, length).float()
    keep = torch.rand(batch, generator=generator) >= DROP_SHARE
    return Batch(
        hidden=torch.randn(tokens, width, generator=generator).to(dtype=dtype, device=device),
        importance=(torch.rand(tokens, generator=generator) * 2 / per_token).to(device),
        cu_seqlens=cu_seqlens.to(device),
        threshold=(1 / length.float()).to(device),
        logits=torch.randn(batch, CLASSES, generator=generator).to(dtype=dtype, device=device),
        keep=keep.to(device),
        seq_index=torch.arange(batch, device=device),
        logits_out=torch.zeros(batch, CLASSES, dtype=dtype, device=device),
        exit_layer=torch.zeros(batch, dtype=torch.int64, device=device),
        layer_index=torch.full((batch,), 3, dtype=torch.int64, device=device),
    )


def prune_eager(
    hidden: torch.Tensor, importance: torch.Tensor, cu_seqlens: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """``prune_tokens`` as eager PyTorch: ``repeat_interleave``, boolean masks, ``nonzero``, ``.item()``."""
    lengths = cu_seqlens.diff()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths)
    keep = importance > threshold[seq]
    keep[cu_seqlens[:-1][lengths > 0].long()] = True
    counts = torch.zeros_like(lengths).index_add_(0, seq, keep.int())
    cu_kept = F.pad(counts.cumsum(0), (1, 0)).int()
    kept_index = keep.nonzero().squeeze(1)
    return hidden.index_select(0, kept_index), cu_kept, int(counts.max()), kept_index


def entropy_eager(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``entropy_exit`` as eager PyTorch: ``log_softmax`` and a sum."""
    log_p = logits.float().log_softmax(dim=1)
    uncertainty = -(log_p.exp() * log_p).sum(dim=1) / math.log(logits.shape[1])
    return uncertainty <= tau, uncertainty


def scatter_eager(out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scatter_rows`` as eager PyTorch: boolean indexing on both sides."""
    out[index[mask]] = rows[mask]
    return out


def drop_eager(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor, seq_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """``drop_sequences`` as eager PyTorch: a token mask from ``repeat_interleave``, boolean indexing."""
    lengths = cu_seqlens.diff()
    kept_lengths = lengths[keep]
    cu_kept = F.pad(kept_lengths.cumsum(0), (1, 0)).int()
    max_kept = int(kept_lengths.max()) if kept_lengths.numel() else 0
    return hidden[torch.repeat_interleave(keep, lengths)], cu_kept, max_kept, seq_index[keep]


def op_calls(backend: str) -> dict[str, dict[str, Callable[[Batch], object]]]:
    """For each operation, the kernel call (``backend``, without value checks, as a model calls it) and eager."""
    exits = lambda b: b.keep.logical_not()
    return {
        "prune_tokens": {
            "mp": lambda b: mp_kernels.prune_tokens(
                b.hidden, b.importance, b.cu_seqlens, b.threshold, backend=backend, validate=False
            ),
            "eager": lambda b: prune_eager(b.hidden, b.importance, b.cu_seqlens, b.threshold),
        },
        "entropy_exit": {
            "mp": lambda b: mp_kernels.entropy_exit(b.logits, TAU, backend=backend, validate=False),
            "eager": lambda b: entropy_eager(b.logits, TAU),
        },
        "scatter_rows": {
            "mp": lambda b: (
                mp_kernels.scatter_rows(b.logits_out, b.logits, b.seq_index, exits(b), backend=backend, validate=False),
                mp_kernels.scatter_rows(
                    b.exit_layer, b.layer_index, b.seq_index, exits(b), backend=backend, validate=False
                ),
            ),
            "eager": lambda b: (
                scatter_eager(b.logits_out, b.logits, b.seq_index, exits(b)),
                scatter_eager(b.exit_layer, b.layer_index, b.seq_index, exits(b)),
            ),
        },
        "drop_sequences": {
            "mp": lambda b: mp_kernels.drop_sequences(
                b.hidden, b.cu_seqlens, b.keep, b.seq_index, backend=backend, validate=False
            ),
            "eager": lambda b: drop_eager(b.hidden, b.cu_seqlens, b.keep, b.seq_index),
        },
    }


def engine_calls(batch: Batch, backend: str) -> dict[str, Callable[[Batch], object]]:
    """The GPU engine's calls after a layer on ``batch`` (threshold, tau and head weights made once here)."""
    device, dtype = batch.hidden.device, batch.hidden.dtype
    width = batch.hidden.shape[1]
    max_seqlen = MAX_LENGTH
    threshold = torch.ones(1, device=device)
    tau = torch.full((1,), TAU, device=device)
    generator = torch.Generator().manual_seed(0)
    head = [
        (torch.randn(*shape, generator=generator) * 0.05).to(device=device, dtype=dtype)
        for shape in ((EXIT_WIDTH, width), (EXIT_WIDTH,), (CLASSES, EXIT_WIDTH), (CLASSES,))
    ]

    def exit_call(b: Batch) -> None:
        alive = b.keep.clone()
        mp_kernels.exit_step(b.hidden, b.cu_seqlens, *head, tau, 3, b.logits_out, b.exit_layer, alive, backend=backend)

    return {
        "compact_prune": lambda b: mp_kernels.compact_tokens(
            b.hidden, b.cu_seqlens, max_seqlen, importance=b.importance, threshold=threshold, keep_first=True,
            backend=backend, validate=False,
        ),
        "exit_step": exit_call,
        "compact_drop": lambda b: mp_kernels.compact_tokens(
            b.hidden, b.cu_seqlens, max_seqlen, alive=b.keep, backend=backend, validate=False
        ),
    }  # fmt: skip


def bert_layer(width: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One BERT encoder layer of width ``width`` (BERT-base at 768), SDPA attention, in eval mode."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig(hidden_size=width, num_attention_heads=HEADS, intermediate_size=4 * width)
    config._attn_implementation = "sdpa"
    return BertLayer(config).to(device=device, dtype=dtype).eval()


def time_layer(
    tokens: int, width: int, dtype: torch.dtype, device: torch.device, layer_seqlen: int, repeats: int
) -> dict[str, float]:
    """Median time of ``bert_layer`` on ``tokens`` tokens as ``tokens / layer_seqlen`` full sequences."""
    layer = bert_layer(width, dtype, device)
    inputs = [torch.randn(tokens // layer_seqlen, layer_seqlen, width, device=device, dtype=dtype) for _ in range(2)]
    with torch.inference_mode():
        return median_ms(layer, inputs, device=device, warmup=2, repeats=repeats)


def run(
    tokens_list: tuple[int, ...],
    widths: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    layer_seqlen: int,
    repeats: int,
    layer_repeats: int,
) -> list[dict[str, Any]]:
    """Time every operation (kernel and eager) and the BERT layer at every size; one record per size."""
    records = []
    calls = op_calls(backend)
    for tokens in tokens_list:
        for width in widths:
            batches = [make_batch(tokens, width, dtype, device, seed) for seed in range(2)]
            record: dict[str, Any] = {
                "tokens": tokens,
                "width": width,
                "batch": batches[0].seq_index.numel(),
                "dtype": str(dtype).removeprefix("torch."),
                "backend": backend,
            }
            mp_total = 0.0
            for op in OPS:
                for impl, call in calls[op].items():
                    record[f"{op}_{impl}"] = median_ms(call, batches, device=device, repeats=repeats)
                mp_ms, eager_ms = record[f"{op}_mp"]["median_ms"], record[f"{op}_eager"]["median_ms"]
                record[f"{op}_speedup"] = eager_ms / mp_ms
                mp_total += mp_ms
            engine_total = 0.0
            for op, call in engine_calls(batches[0], backend).items():
                record[f"{op}_engine"] = median_ms(call, batches, device=device, repeats=repeats)
                engine_total += record[f"{op}_engine"]["median_ms"]
            record["layer"] = time_layer(tokens, width, dtype, device, layer_seqlen, layer_repeats)
            record["compaction_total_ms"] = mp_total
            record["share_of_layer"] = mp_total / record["layer"]["median_ms"]
            record["engine_total_ms"] = engine_total
            record["engine_share_of_layer"] = engine_total / record["layer"]["median_ms"]
            records.append(record)
            print(summary_line(record), flush=True)
    return records


def summary_line(record: dict[str, Any]) -> str:
    ratios = "  ".join(f"{op} {record[f'{op}_mp']['median_ms']:.3f} ms x{record[f'{op}_speedup']:.2f}" for op in OPS)
    return (
        f"tokens {record['tokens']:>6} d {record['width']}: {ratios}  | layer {record['layer']['median_ms']:.2f} ms,"
        f" compaction {100 * record['share_of_layer']:.2f}% of it, engine variant"
        f" {100 * record['engine_share_of_layer']:.2f}%"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON with provenance to this file")
    parser.add_argument("--cpu-small", action="store_true", help="small sizes on the CPU, PyTorch backend")
    parser.add_argument("--layer-seqlen", type=int, default=LAYER_SEQLEN, help="sequence length of the layer")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (--cpu-small: 1 unless given)")
    args = parser.parse_args(argv)
    if args.threads or args.cpu_small:
        torch.set_num_threads(args.threads or 1)
    if args.cpu_small:
        device, tokens_list, repeats, layer_repeats = torch.device("cpu"), CPU_SMALL_TOKENS, 10, 3
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokens_list, repeats, layer_repeats = TOKENS, 50, 20
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "torch"
    records = run(tokens_list, WIDTHS, dtype, device, backend, args.layer_seqlen, repeats, layer_repeats)
    if args.out:
        meta = provenance(device)
        meta.update(
            {
                "benchmark": "compaction",
                "shapes": {"tokens": list(tokens_list), "widths": list(WIDTHS), "lengths": [MIN_LENGTH, MAX_LENGTH]},
                "dtype": str(dtype).removeprefix("torch."),
                "backend": backend,
                "layer": {"module": "transformers BertLayer (sdpa)", "seqlen": args.layer_seqlen, "heads": HEADS},
            }
        )
        print(f"wrote {write_results(args.out, records, meta)}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="compaction benchmarks need a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("impl", ["mp", "eager"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_compaction(benchmark, tokens: int, width: int, op: str, impl: str) -> None:
    device = torch.device("cuda")
    batch = make_batch(tokens, width, torch.float16, device, 0)
    call = op_calls("triton")[op][impl]

    def step() -> None:
        call(batch)
        torch.cuda.synchronize()

    benchmark.extra_info.update({"tokens": tokens, "width": width, "batch": batch.seq_index.numel()})
    benchmark.pedantic(step, warmup_rounds=5, rounds=50)


@requires_cuda
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_bert_layer(benchmark, tokens: int, width: int) -> None:
    device = torch.device("cuda")
    layer = bert_layer(width, torch.float16, device)
    x = torch.randn(tokens // LAYER_SEQLEN, LAYER_SEQLEN, width, device=device, dtype=torch.float16)

    def step() -> None:
        with torch.inference_mode():
            layer(x)
        torch.cuda.synchronize()

    benchmark.extra_info.update({"tokens": tokens, "width": width, "seqlen": LAYER_SEQLEN})
    benchmark.pedantic(step, warmup_rounds=3, rounds=20)


if __name__ == "__main__":
    main()
