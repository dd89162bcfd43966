"""Wall-clock timing for benchmarks: warm-up, then the median of many repeats, on CPU or CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def median_ms(
    fn: Callable[[Any], object],
    inputs: Sequence[Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
) -> dict[str, float]:
    """Time ``fn(x)`` for ``x`` rotating through ``inputs`` (pass several, larger than cache together).

    Returns the median, minimum and interquartile range in milliseconds over ``repeats`` calls, after
    ``warmup`` untimed calls. CUDA calls are timed with events around each call.
    """
    device = torch.device(device)
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times: list[float] = []
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - begin) * 1e3)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iqr_ms": quartiles[2] - quartiles[0]}
