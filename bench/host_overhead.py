"""Host work of one GPU-engine call: the Python time of ``model(...)`` and of the engine alone, the forward itself
stubbed out (a floor the device cannot hide at batch 1, where a graph replay takes a few hundred microseconds).

``model(..., engine="graph", validate=False)`` runs the argument checks, the knob resolution, the weight-change
check, the input copy, the replay (here: nothing) and the output copy; ``GraphEngine.__call__`` alone skips the
model's checks. Random BERT-base and MiniLM-sized models, one batch per batch size, median over ``--repeats``
rounds of ``--calls`` calls. ``python -m bench.host_overhead --out bench/results/e2e/host-overhead-cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from bench.floors import MODELS  # noqa: E402
from bench.provenance import provenance, write_results  # noqa: E402
from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification  # noqa: E402


def per_call_us(call: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` rounds of the mean wall time of ``calls`` calls, in microseconds."""
    for _ in range(10):
        call()
    rounds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(rounds)


def measure(name: str, batch: int, width: int, calls: int, repeats: int) -> dict[str, Any]:
    """Host microseconds per call of the model and of its engine, with the static forward stubbed out."""
    torch.manual_seed(0)
    config = MagicPyramidConfig(**MODELS[name], prune_thresholds=[0.01] * MODELS[name]["num_hidden_layers"])
    model = MagicPyramidForSequenceClassification(config).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    ids = torch.randint(1000, 2000, (batch, width), device=device)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    engine = model.graph_engine
    engine._static_forward = lambda plan: None  # host work only
    knobs = dict(tau=0.3, threshold_scale=1.0, backend="triton")
    with torch.no_grad():
        model_us = per_call_us(lambda: model(ids, mask, types, engine="graph", validate=False, **knobs), calls, repeats)
        resolved = model.resolve_knobs(prune=True, early_exit=True, **knobs)
        engine_us = per_call_us(lambda: engine(ids, mask, types, resolved), calls, repeats)
    return {"model": name, "batch_size": batch, "width": width, "model_call_us": model_us, "engine_call_us": engine_us}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    records = [
        measure(name, batch, 64, args.calls, args.repeats) for name in ("bert-base", "minilm") for batch in (1, 64)
    ]
    for r in records:
        model_us, engine_us = r["model_call_us"], r["engine_call_us"]
        print(f"{r['model']} b{r['batch_size']}: model {model_us:.0f} us, engine {engine_us:.0f} us")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {**provenance(device), "benchmark": "host_overhead", "settings": vars(args)}
    write_results(args.out, records, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
