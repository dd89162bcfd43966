"""Arrival counters for single-launch, deterministic two-phase kernels ("the last program to arrive finishes").

A kernel that splits one result over several programs (split-K GEMM tiles, a sequence's row chunks, the head
groups of a key block) can finish it in the same launch: every program writes its partial result, then takes a
ticket from a counter with ``arrive``; the program that draws the last ticket reads all partials in a fixed order
and writes the result. The order of the final sum does not depend on which program arrived last, so the result is
deterministic, and no value is ever accumulated by an atomic. The last program sets the counter back to 0, so a
counter buffer that starts at zero stays at zero between launches: one buffer, zeroed once per device, serves
every launch and every CUDA-graph replay with no memset kernel.

Rules for a kernel that uses them: take ``counters(n, device)`` before the launch (never first under CUDA-graph
capture: the engine's warm-up runs every shape eagerly before capturing, and growth under capture raises);
give each finishing group its own counter; read the partials of other programs with ``cache_modifier=".cg"``
(L2, not a possibly stale L1). Launches that share the buffer must not run concurrently on two streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BUFFERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers: CUDA graphs captured earlier still point at them
MIN_COUNTERS = 65536


def counters(count: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``count`` arrival counters on ``device``, shared by every launch.

    At least ``MIN_COUNTERS`` (256 KB); grown to the next power of two when too small. Growth allocates and
    zeroes a new buffer, which a CUDA graph under capture must not do: it raises ``RuntimeError`` there (run the
    shape once before capturing). An outgrown buffer is kept alive, never freed: graphs captured before the
    growth go on using it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = _BUFFERS.get(device)
    if buffer is None or buffer.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"arrival counters must grow to {count} during CUDA-graph capture: run the same shapes once "
                "before capturing"
            )
        if buffer is not None:
            _RETIRED.append(buffer)
        buffer = torch.zeros(max(triton.next_power_of_2(count), MIN_COUNTERS), dtype=torch.int32, device=device)
        _BUFFERS[device] = buffer
    return buffer


@triton.jit
def arrive(counter_ptr, expected):
    """Take a ticket from the counter at ``counter_ptr``; True in the last of ``expected`` programs to arrive.

    A block barrier first makes every thread's stores precede the ticket (the atomic's release covers the thread
    that issues it); the atomic has acquire-release order, so every store the program made before is visible to
    the last program, which resets the counter to 0 for the next launch.
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = ticket == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
    return last
