"""Floors of the GPU end-to-end cases: FLOPs, bytes, kernel launches and host synchronisations per forward.

For each model (BERT-base, MiniLM), input bucket (the real texts of ``bench.e2e``) and batch size (1, 8, 64) it
gives the dense FLOPs of the unpadded inputs and of the padded batch, the bytes a forward must move at least
(the encoder's weights once, bf16, plus each layer's activations written and read once: ``tokens x (6 d + 2 d_ff)
x 2`` bytes), the time floors at the H200's bf16 rate and bandwidth, and the graph engine's kernel launches,
counted by recording its static forward (``bench.launches``) on a CPU under the Triton interpreter at toy
width, since launches depend on the layer count and the switches, not on sizes. Host synchronisations: 0 by
construction (``tests/test_graph_engine.py`` asserts it). Run ``python -m bench.floors`` for the table in
``bench/NOTES.md``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from transformers import BertConfig  # noqa: E402

from bench.launches import count_launches, record_launches  # noqa: E402
from mp_model.flops import dense_flops  # noqa: E402

PEAK_TFLOPS = 790.0
BANDWIDTH_TBS = 4.8
MODELS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
BATCH_SIZES = (1, 8, 64)


def engine_launches(layers: int) -> dict[str, dict[str, int]]:
    """Launches of the engine's static forward for each switch setting, at toy width on the CPU."""
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=50,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        prune_thresholds=[0.5] * layers,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MagicPyramidForSequenceClassification(config).float().eval().to(device)
    ids = torch.ones(2, 16, dtype=torch.int64, device=device)
    counts = {}
    settings = (("dense", False, False), ("ltp", True, False), ("fastbert", False, True), ("mp", True, True))
    for name, prune, early_exit in settings:
        knobs = model.resolve_knobs(tau=0.0, prune=prune, early_exit=early_exit, backend="triton")
        model.graph_engine(ids, torch.ones_like(ids), None, knobs)  # one-time work: fused weights, counters
        with record_launches() as calls:
            model.graph_engine(ids, torch.ones_like(ids), None, knobs)
        counts[name] = count_launches(calls)
    return counts


def per_layer_launches() -> dict[str, dict[str, dict[str, int]]]:
    """Launches of one layer and of everything outside the layers, for each switch setting.

    Differences of ``engine_launches`` at 3 and 2 layers (every layer identical, all of them pruning):
    ``layer = launches(3) - launches(2)``, ``outside = launches(2) - 2 x layer``; each split into ``triton``,
    ``aten`` and ``total`` as ``count_launches``.
    """
    two, three = engine_launches(2), engine_launches(3)
    result = {}
    for name in two:
        layer = {kind: three[name][kind] - two[name][kind] for kind in two[name]}
        outside = {kind: two[name][kind] - 2 * layer[kind] for kind in two[name]}
        result[name] = {"layer": layer, "outside": outside}
    return result


def case_floors(config: BertConfig, lengths: list[int], width: int) -> dict[str, Any]:
    """FLOPs and bytes floors of one padded batch of these unpadded lengths."""
    d, d_ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    flops = sum(dense_flops(config, n) for n in lengths)
    padded = len(lengths) * dense_flops(config, width)
    weights = layers * (4 * d * d + 2 * d * d_ff) * 2
    activations = layers * sum(lengths) * (6 * d + 2 * d_ff) * 2
    return {
        "batch": len(lengths),
        "tokens": sum(lengths),
        "width": width,
        "gflops": flops / 1e9,
        "padded_gflops": padded / 1e9,
        "flops_floor_ms": flops / (PEAK_TFLOPS * 1e12) * 1e3,
        "mbytes": (weights + activations) / 1e6,
        "bytes_floor_ms": (weights + activations) / (BANDWIDTH_TBS * 1e12) * 1e3,
    }


def table(seed: int = 0) -> str:
    from transformers import AutoTokenizer

    from bench.e2e_inputs import build_pools
    from bench.e2e_models import tokenizer_path

    pools = build_pools(AutoTokenizer.from_pretrained(tokenizer_path(None)), 64, 512, seed)
    lines = [
        "| model | bucket | batch | tokens (width) | GFLOP (padded) | FLOPs floor ms | MB moved | bytes floor ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, sizes in MODELS.items():
        config = BertConfig(**sizes)
        for bucket, encoded in pools.items():
            for batch in BATCH_SIZES:
                lengths = [len(ids) for ids in encoded["input_ids"][:batch]]
                row = case_floors(config, lengths, max(lengths))
                lines.append(
                    f"| {model} | {bucket} | {batch} | {row['tokens']} ({row['width']}) | {row['gflops']:.2f} "
                    f"({row['padded_gflops']:.2f}) | {row['flops_floor_ms']:.3f} | {row['mbytes']:.0f} | "
                    f"{row['bytes_floor_ms']:.3f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(table())
    print()
    print("| layers | switches | Triton launches | ATen kernels | total |")
    print("|---|---|---|---|---|")
    for layers in (6, 12):
        for name, count in engine_launches(layers).items():
            print(f"| {layers} | {name} | {count['triton']} | {count['aten']} | {count['total']} |")
    print()
    print("| switches | per layer: Triton | per layer: ATen | outside the layers: Triton | outside: ATen |")
    print("|---|---|---|---|---|")
    for name, split in per_layer_launches().items():
        layer, outside = split["layer"], split["outside"]
        print(f"| {name} | {layer['triton']} | {layer['aten']} | {outside['triton']} | {outside['aten']} |")


if __name__ == "__main__":
    main()
