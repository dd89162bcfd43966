"""Wall-clock timing, the one timer of the application and the benchmarks, on CPU or CUDA.

``median_ms`` times one call at a time: warm-up calls, then the median of many repeats (CUDA events around each
call on a GPU, ``perf_counter`` on a CPU); ``bench/`` uses it. ``pass_ms`` times one pass over a list of batches and
``interleaved_timings`` alternates several runners round by round, as ``mp eval`` times the HF baseline and each
setting.
"""

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


def pass_ms(
    run: Callable[[dict[str, torch.Tensor]], object], inputs: list[dict[str, torch.Tensor]], device: torch.device
) -> float:
    """Wall time of running every batch of ``inputs`` once, in milliseconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for batch in inputs:
        run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def interleaved_timings(
    runners: Sequence[Callable[[dict[str, torch.Tensor]], object]],
    inputs: list[dict[str, torch.Tensor]],
    device: torch.device,
    repeats: int,
) -> list[list[float]]:
    """Pass times of every runner, in ms per batch, ``repeats`` rounds after one warm-up round.

    Each round runs every runner once, one after the other, so a change of machine load between rounds hits the
    baseline and the settings alike; ratios are taken within a round. Returns ``times[runner][round]``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for run in runners:
        pass_ms(run, inputs, device)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for run, row in zip(runners, times, strict=True):
            row.append(pass_ms(run, inputs, device) / len(inputs))
    return times
