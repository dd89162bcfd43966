"""pytest-benchmark functions for the end-to-end paths; ``bench.e2e`` is the full sweep with JSON output.

Each case runs one method of ``bench.e2e`` (HF eager and sdpa, packed dense, LTP, FastBERT, MP) on the stock
MiniLM replaying ``bench.e2e.DEFAULT_SCHEDULE`` (thresholds calibrated once per session), rotating through two
real batches of 8 short or mixed-length texts. GPU cases (float16) need CUDA. The FLOPs speedup of the case's
inputs is recorded in ``extra_info``::

    python -m pytest bench/bench_e2e.py --benchmark-only
    python -m bench.bench_e2e --models minilm --batch-sizes 8   # script mode: bench.e2e's command line
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from bench import e2e

BATCH_SIZE = 8
BUCKETS = ("short", "mixed")
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The MiniLM subject, its inputs per bucket and the kernel backend, on one device."""
    if request.param == "cuda" and not ON_GPU:
        pytest.skip("needs CUDA")
    device = torch.device(request.param)
    argv = ["--models", "minilm", "--device", request.param, "--quiet"]
    args = e2e.parse_args(argv + (["--dtype", "float16"] if device.type == "cuda" else []))
    e2e.transformers_logging.set_verbosity_error()
    path = e2e.tokenizer_path(None)
    pools = e2e.build_pools(AutoTokenizer.from_pretrained(path), 2 * BATCH_SIZE, args.max_length, args.seed)
    backend = None if device.type == "cuda" else "torch"
    calibration = e2e.calibration_batch(pools, args.calibration_examples, device)
    dtype = e2e.DTYPES[args.dtype]
    subject = e2e.make_subject("minilm", args, path, device, dtype, calibration, lambda: e2e.DEFAULT_SCHEDULE, backend)
    distribution = subject.schedule.exit_distribution
    inputs = {b: e2e.cell_batches(pools[b], BATCH_SIZE, 2, device, distribution, args.seed) for b in BUCKETS}
    return {"subject": subject, "inputs": inputs, "backend": backend, "device": device}


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("method", e2e.METHODS)
def test_e2e(benchmark: Any, setup: dict[str, Any], method: str, bucket: str) -> None:
    subject, device = setup["subject"], setup["device"]
    inputs = setup["inputs"][bucket]
    fn = e2e.runner(subject, method, setup["backend"])
    with torch.inference_mode():
        outputs = [fn(x) for x in inputs]
    stats = e2e.output_stats(subject, method, inputs, [] if method.startswith("hf_") else outputs)
    rotation = itertools.cycle(inputs)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def call() -> None:
        with torch.inference_mode():
            fn(next(rotation))
        synchronize()

    benchmark.extra_info.update(
        device=device.type, bucket=bucket, batch_size=BATCH_SIZE, flops_speedup=stats["flops_speedup"]
    )
    benchmark.pedantic(call, rounds=6 if device.type == "cpu" else 50, warmup_rounds=2)


if __name__ == "__main__":
    raise SystemExit(e2e.main())
