"""Time split of the packed methods of ``bench.e2e`` from ``torch.profiler`` over the model's ``mp.<stage>`` ranges.

One profiled pass through a cell's batches (CPU time on CPU, the time of the kernels launched inside each range
on CUDA) gives each range's time; ``stage_split`` groups them into ``STAGES``: attention, importance (the share of
the attention range that computing token importance adds, from ``importance_overhead``), compaction (prune +
drop), exit (sub-classifier + exit test), feed-forward, onnx_runtime (a lone sequence's layers in ONNX Runtime
sessions, which the profiler does not split) and qkv/other (the rest of the call). Graph replays hide
the ranges, so only the packed methods are split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import BertConfig

from bench.timing import median_ms
from mp_kernels import varlen_attention

# Time split categories, in print order, and the profiler ranges (``mp.<name>``) of the model.
STAGES = ("attention", "importance", "compaction", "exit", "feed_forward", "onnx_runtime", "qkv_other")
RANGES = (
    "qkv",
    "attention",
    "attention_output",
    "prune",
    "feed_forward",
    "exit_head",
    "exit_test",
    "drop",
    "classifier",
    "ort_layers",
)
TOTAL_RANGE = "e2e.forward"


def profile_ranges(
    fn: Callable[[dict[str, torch.Tensor]], object], inputs: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[dict[str, float], list[object]]:
    """Milliseconds per call in each ``mp.<stage>`` range and in the whole call (``total``), and the outputs.

    One profiled call per input; CPU time of each range on CPU, device time of the kernels launched inside it on
    CUDA. Ranges that did not run are 0.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    outputs = []
    with profile(activities=activities) as prof:
        for x in inputs:
            with record_function(TOTAL_RANGE):
                outputs.append(fn(x))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(["total", *RANGES], 0.0)
    names = {f"mp.{name}": name for name in RANGES} | {TOTAL_RANGE: "total"}
    for event in prof.events():
        name = names.get(event.name)
        if name is None or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        totals[name] += event.device_time_total if device.type == "cuda" else event.cpu_time_total
    return {name: us / 1e3 / len(inputs) for name, us in totals.items()}, outputs


def importance_overhead(
    batch: dict[str, torch.Tensor], config: BertConfig, dtype: torch.dtype, backend: str | None, repeats: int
) -> float:
    """Share of ``varlen_attention``'s time spent on token importance, on ``batch``'s first-layer packed shapes.

    ``1 - t(without importance) / t(with importance)`` on random Q/K/V of the batch's lengths, clipped to [0, 1].
    """
    device = batch["input_ids"].device
    lengths = batch["attention_mask"].sum(dim=1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    heads = config.num_attention_heads
    shape = (int(lengths.sum()), heads, config.hidden_size // heads)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    longest = int(lengths.max())

    def attend(importance: bool) -> float:
        def call(_: object) -> object:
            return varlen_attention(
                q, k, v, cu_seqlens, longest, return_importance=importance, backend=backend, validate=False
            )

        return median_ms(call, [None], device=device, warmup=1, repeats=repeats)["median_ms"]

    with_importance, without = attend(True), attend(False)
    return min(1.0, max(0.0, 1.0 - without / with_importance))


def stage_split(ranges: dict[str, float], importance_share: float) -> dict[str, float]:
    """The profiled ranges grouped into ``STAGES`` (ms per call); ``qkv_other`` is the rest of the call."""
    attention = ranges["attention"]
    split = {
        "attention": attention * (1 - importance_share),
        "importance": attention * importance_share,
        "compaction": ranges["prune"] + ranges["drop"],
        "exit": ranges["exit_head"] + ranges["exit_test"],
        "feed_forward": ranges["feed_forward"],
        "onnx_runtime": ranges["ort_layers"],
    }
    split["qkv_other"] = max(0.0, ranges["total"] - sum(split.values()))
    return split
