"""A lone sequence's remaining layers through ONNX Runtime sessions (``mp_model.ort_layers``), exits included.

The packed path hands a sequence over once it is the only one left (at batch size 1 from the start, with its token
ids, so that the embeddings run in the first session too): without sub-classifiers all remaining layers and the
main classifier are one session call; with them, one call per layer, each returning the layer's sub-classifier
logits and their uncertainty, which the exit test compares with ``tau`` on the host (``mp_kernels.entropy_exit``'s
rule: exit when ``uncertainty <= tau``; NaN never exits), or the replayed schedule's layer, to decide whether the
next layer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mp_model.ort_layers import OrtLayers


@dataclass
class LoneResult:
    """What the remaining layers gave: ``logits`` ``(1, labels)`` (of the sub-classifier the sequence exited at,
    or the main classifier), ``exit_layer`` (layers run in all), the token count after each layer run here, and the
    sub-classifier logits ``(1, labels)`` of each of those layers but the last one of the model."""

    logits: torch.Tensor
    exit_layer: int
    counts: list[int]
    exit_logits: list[torch.Tensor] = field(default_factory=list)


def run_lone_sequence(
    runner: OrtLayers,
    start: int,
    inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    thresholds: list[float],
    *,
    tau: float,
    early_exit: bool,
    exit_after: int | None,
    return_exit_logits: bool,
) -> LoneResult:
    """Layers ``start`` onwards on one sequence.

    ``inputs``: hidden states ``(n, d)`` float32 entering layer ``start``, or (``start == 0``) token ids and token
    type ids ``(n,)`` int64. ``thresholds``: every layer's scaled pruning threshold. ``exit_after``: the replayed
    schedule's exit layer for this sequence (None: the entropy test at ``tau``). ``return_exit_logits``: run every
    sub-classifier (also without ``early_exit``).
    """
    layers = len(runner.layers)
    if not (early_exit or return_exit_logits):
        run = runner.run(start, layers, inputs, thresholds[start:], exit_head=False)
        return LoneResult(run.logits, layers, run.counts)
    result = LoneResult(torch.empty(0), layers, [])
    for index in range(start, layers):
        head = index < layers - 1
        run = runner.run(index, index + 1, inputs, thresholds[index : index + 1], exit_head=head)
        inputs = run.hidden
        result.counts += run.counts
        if not head:
            result.logits = run.logits
            break
        result.exit_logits.append(run.exit_logits)
        leaves = run.uncertainty <= tau if exit_after is None else exit_after == index + 1
        if early_exit and leaves:
            result.logits, result.exit_layer = run.exit_logits, index + 1
            break
    return result
