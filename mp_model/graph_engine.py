"""The GPU engine: the whole Magic Pyramid forward pass with no host synchronisation, replayed as CUDA graphs.

The packed path (``mp_model.packed_inference``) sizes every tensor from the host, so each compaction reads a
count back and each layer launches dozens of small operators: right on a CPU, slow on a GPU. This engine keeps
the same arithmetic but gives every tensor a shape fixed by a *bucket*, the batch rounded up to
``batch_buckets`` and the width to ``width_buckets``:

* sequences keep their *slot* for the whole pass; a slot that exits, or pads the batch, becomes empty (length
  0 in ``cu_seqlens``), and every kernel skips empty slots;
* the packed tokens live in a buffer of ``batch x width`` rows; ``cu_seqlens[-1]``, in device memory, says how
  many are live, and every kernel reads its sizes from there: ``rows_linear`` (projections, feed-forward) and
  ``add_layer_norm`` skip the dead rows, ``varlen_attention`` the empty slots and blocks;
* a layer is at most 7 launches: the fused Q/K/V GEMM, attention, the importance pass that also decides the
  pruning (``varlen_attention(..., prune_threshold=...)``: head-group sum, keep rule, counts and each row's
  destination, in one launch), the attention-output GEMM whose epilogue adds the residual, normalises and moves
  each kept row to its destination (``linear_add_layer_norm(..., dest=...)``), the two feed-forward GEMMs (the
  second with the same epilogue) and ``exit_step`` (pools, classifies, tests and records the exits); a dense
  layer is 5. An exited slot is not moved away: the next pruning layer drops it with the pruned tokens
  (``alive``); only before a layer that does not prune does ``compact_tokens`` drop exited slots (1 launch);
* ``embed_pack`` embeds, normalises and packs the padded batch (1 launch) and ``finish_slots`` runs the pooler and
  classifier of the slots still running, completes ``kept_tokens`` and counts FLOPs (1 launch): no ATen kernel
  runs inside the forward, and a call adds at most 4 (copying the inputs in, one copy of the outputs out);
* the GEMMs (``rows_linear``, ``linear_add_layer_norm``) split K over several programs where the bucket has too
  few rows to fill the GPU, with a deterministic fix-up in the same launch (``mp_kernels/_triton/semaphores.py``);
* the knobs (``mp_model.knobs.ResolvedKnobs``) ``tau`` and the scaled thresholds are copied into device tensors
  before a replay when they changed, so one captured graph serves any setting; only the set of layers that prune
  (``prune_layers``) and the switches ``early_exit`` / ``exit_schedule`` select another graph;
* FLOPs follow ``mp_model.flops`` (its coefficients, ``flops_coefficients``), as on the packed path.

On CUDA with the Triton backend each bucket's forward is captured once into a ``torch.cuda.CUDAGraph`` (all
graphs share one memory pool; at most ``max_graphs`` are kept, least recently used dropped) and replayed; on the
CPU, or with ``use_graphs=False``, the same static forward runs eagerly. When every sequence has exited, the
remaining layers still launch their kernels, which return at once (a few microseconds each). Where the packed
and graph loops run the same six steps (unpad, project, attend, add and normalise, prune, exit and drop), they are
written separately: the packed path sizes every step from the host, this one fuses steps that the packed path
cannot (the move into the normalisation, the decision into the importance pass).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mp_kernels import (
    compact_tokens,
    embed_pack,
    exit_step,
    finish_slots,
    linear_add_layer_norm,
    rows_linear,
    varlen_attention,
)
from mp_kernels.dispatch import choose_backend
from mp_model.engine import ModelParts
from mp_model.flops import flops_coefficients
from mp_model.fused_weights import FusedWeights, refresh_fused_qkv
from mp_model.knobs import ResolvedKnobs
from mp_model.outputs import MagicPyramidOutput

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_WIDTH_BUCKETS = (16, 32, 64, 128, 256, 512)
DEFAULT_MAX_GRAPHS = 64
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def bucket(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size``, or ``size`` itself past the largest."""
    return next((b for b in buckets if b >= size), size)


@dataclass(frozen=True)
class PlanKey:
    """What selects a captured graph: the bucket shape, the backend and the structure of the forward."""

    batch: int
    width: int
    backend: str
    prune_layers: tuple[bool, ...]
    early_exit: bool
    scheduled: bool


@dataclass
class Plan:
    """Static input, knob and output tensors of one bucket, and its CUDA graph (None when run eagerly).

    ``inputs`` int64 ``(3, batch, width)`` holds the input ids, the attention mask and the token types, so that one
    copy fills them; ``outputs`` is one byte buffer holding every output (``output_views``), so that one copy
    takes them out.
    """

    key: PlanKey
    inputs: torch.Tensor
    schedule: torch.Tensor
    tau: torch.Tensor
    thresholds: torch.Tensor
    outputs: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    memory_bytes: int = 0
    capture_s: float = 0.0
    knobs: tuple[Any, ...] = ()


def output_views(store: torch.Tensor, batch: int, layers: int, classes: int, dtype: torch.dtype):
    """Typed views of an output byte buffer: ``exit_layer (B,)``, ``flops (B,)``, ``kept (layers, B)`` int64 and
    ``logits (B, classes)`` in ``dtype``; ``store`` holds ``output_bytes(...)`` uint8."""
    ints = batch * (layers + 2)
    words = store[: ints * 8].view(torch.int64)
    logits = store[ints * 8 : ints * 8 + batch * classes * dtype.itemsize].view(dtype).view(batch, classes)
    return words[:batch], words[batch : 2 * batch], words[2 * batch :].view(layers, batch), logits


def output_bytes(batch: int, layers: int, classes: int, dtype: torch.dtype) -> int:
    """Bytes of the output buffer of ``output_views``."""
    return batch * (layers + 2) * 8 + batch * classes * dtype.itemsize


class GraphEngine:
    """Sync-free, bucketed forward of a model's ``parts`` (``mp_model.engine.Engine``); see the module docstring.

    Args:
        parts: the model's modules (``ModelParts``; the model itself satisfies it): their current device and dtype
            are used; moving them invalidates the graphs, which are recaptured on next use.
        use_graphs: capture CUDA graphs (default: on CUDA with the Triton backend).
        batch_buckets, width_buckets: the bucket sizes (inputs are padded up; a size past the largest bucket
            gets a bucket of its own).
        max_graphs: most graphs kept at once.
    """

    def __init__(
        self,
        parts: ModelParts,
        *,
        use_graphs: bool | None = None,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        width_buckets: Sequence[int] = DEFAULT_WIDTH_BUCKETS,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        activation = parts.config.hidden_act
        if activation not in ACTIVATIONS:
            raise ValueError(f"the graph engine supports hidden_act in {sorted(ACTIVATIONS)}, got {activation!r}")
        self.parts = parts
        self.activation = ACTIVATIONS[activation]
        self.use_graphs = use_graphs
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.width_buckets = tuple(sorted(w for w in width_buckets if w <= parts.config.max_position_embeddings))
        self.max_graphs = max_graphs
        self._plans: OrderedDict[PlanKey, Plan] = OrderedDict()
        self._fused = FusedWeights()
        self._pointers: tuple[int, ...] = ()
        self._pool: Any = None
        self._parameters = [*parts.bert.parameters(), *parts.exits.parameters(), *parts.classifier.parameters()]
        self._projections = [
            (a.query, a.key, a.value) for a in (layer.attention.self for layer in parts.bert.encoder.layer)
        ]
        self._projection_tensors = [p for trio in self._projections for m in trio for p in (m.weight, m.bias)]
        self._coefficients = flops_coefficients(parts.config)

    # ----------------------------------------------------------------------------------------------- state
    def _sync_weights(self) -> None:
        """Drop every plan if the model's tensors moved; refresh the fused Q/K/V weights if they changed.

        About 20 us per call for BERT-base (cached parameter lists: ``data_ptr`` of every parameter, the
        version counters of the Q/K/V ones); walking ``model.parameters()`` each call cost 375 us.
        """
        pointers = (self._parameters[0].dtype, *map(torch.Tensor.data_ptr, self._parameters))
        if pointers != self._pointers:
            self._plans.clear()
            self._fused = FusedWeights()
            self._pointers = pointers
        versions = tuple(p._version for p in self._projection_tensors)
        refresh_fused_qkv(self._fused, self._projections, versions)

    def _plan(self, key: PlanKey) -> Plan:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        # The caller's mode only for the call: a plan's tensors made as inference tensors (under
        # ``torch.inference_mode``) could not be updated in place by a later call outside it.
        with torch.inference_mode(False), torch.no_grad():
            plan = self._new_plan(key)
        self._plans[key] = plan
        return plan

    def _new_plan(self, key: PlanKey) -> Plan:
        """A plan's static tensors for ``key`` (and its CUDA graph, where graphs are on); evicts the oldest plan
        when ``max_graphs`` are kept."""
        weight = self._parameters[0]
        device, dtype = weight.device, weight.dtype
        config = self.parts.config
        layers = config.num_hidden_layers
        score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        size = output_bytes(key.batch, layers, config.num_labels, dtype)
        plan = Plan(
            key=key,
            inputs=torch.zeros((3, key.batch, key.width), dtype=torch.int64, device=device),
            schedule=torch.zeros(key.batch, dtype=torch.int64, device=device),
            tau=torch.zeros(1, dtype=torch.float32, device=device),
            thresholds=torch.zeros(layers, dtype=score_dtype, device=device),
            outputs=torch.zeros(size, dtype=torch.uint8, device=device),
        )
        while len(self._plans) >= self.max_graphs:
            self._plans.popitem(last=False)
        if self._graphs_on(device, key.backend):
            self._capture(plan)
        return plan

    def _graphs_on(self, device: torch.device, backend: str) -> bool:
        wanted = self.use_graphs if self.use_graphs is not None else True
        return wanted and device.type == "cuda" and backend == "triton"

    def _capture(self, plan: Plan) -> None:
        """Compile and warm up on a side stream, then capture the static forward into a CUDA graph."""
        device = plan.inputs.device
        started = time.perf_counter()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self._static_forward(plan)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_allocated(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            self._static_forward(plan)
        plan.graph = graph
        plan.memory_bytes = torch.cuda.memory_allocated(device) - before
        plan.capture_s = time.perf_counter() - started

    # --------------------------------------------------------------------------------------------- forward
    def _static_forward(self, plan: Plan) -> None:
        """The forward pass on the plan's static tensors: shapes fixed by the bucket, no host read.

        Writes ``plan.outputs`` (``output_views``: ``exit_layer``, ``flops``, ``kept (layers, B)``, ``logits``).
        """
        parts, key = self.parts, plan.key
        config, bert = parts.config, parts.bert
        batch, width, backend = key.batch, key.width, key.backend
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        capacity = batch * width
        dtype = self._parameters[0].dtype
        exit_layer, flops, kept, logits = output_views(plan.outputs, batch, layers, config.num_labels, dtype)
        embeddings = bert.embeddings
        norm = embeddings.LayerNorm
        hidden, cu, lengths, alive = embed_pack(
            plan.inputs[0],
            plan.inputs[2],
            plan.inputs[1],
            embeddings.word_embeddings.weight,
            embeddings.position_embeddings.weight,
            embeddings.token_type_embeddings.weight,
            norm.weight,
            norm.bias,
            norm.eps,
            backend=backend,
            validate=False,
        )
        schedule = plan.schedule if key.scheduled else None
        for index, layer in enumerate(bert.encoder.layer):
            rows = cu[-1:]
            qkv = rows_linear(hidden, self._fused.weight[index], self._fused.bias[index], rows, backend=backend)
            q, k, v = qkv.view(capacity, 3, heads, head_dim).unbind(1)
            dest, after = None, cu
            if key.prune_layers[index]:
                context, pruning = varlen_attention(
                    q,
                    k,
                    v,
                    cu,
                    width,
                    prune_threshold=plan.thresholds[index : index + 1],
                    keep_first=True,
                    alive=alive,
                    counts=kept[index],
                    backend=backend,
                    validate=False,
                )
                dest, after = pruning.dest, pruning.cu_seqlens_out
            else:
                context = varlen_attention(q, k, v, cu, width, backend=backend, validate=False)
            block = layer.attention.output
            attended = linear_add_layer_norm(
                context.view(capacity, -1),
                block.dense.weight,
                block.dense.bias,
                hidden,
                block.LayerNorm.weight,
                block.LayerNorm.bias,
                block.LayerNorm.eps,
                rows,
                dest=dest,
                backend=backend,
            )
            cu = after
            rows = cu[-1:]
            dense = layer.intermediate.dense
            inner = rows_linear(attended, dense.weight, dense.bias, rows, activation=self.activation, backend=backend)
            out = layer.output
            hidden = linear_add_layer_norm(
                inner,
                out.dense.weight,
                out.dense.bias,
                attended,
                out.LayerNorm.weight,
                out.LayerNorm.bias,
                out.LayerNorm.eps,
                rows,
                backend=backend,
            )
            if key.early_exit and index < layers - 1:
                head = parts.exits[index]
                exit_step(
                    hidden,
                    cu,
                    head.dense.weight,
                    head.dense.bias,
                    head.classifier.weight,
                    head.classifier.bias,
                    plan.tau,
                    index + 1,
                    logits,
                    exit_layer,
                    alive,
                    schedule=schedule,
                    max_seqlen=width,
                    backend=backend,
                )
                if not key.prune_layers[index + 1]:
                    hidden, cu = compact_tokens(hidden, cu, width, alive=alive, backend=backend, validate=False)
        pooler = bert.pooler.dense
        finish_slots(
            hidden,
            cu,
            pooler.weight,
            pooler.bias,
            parts.classifier.weight,
            parts.classifier.bias,
            alive,
            lengths,
            logits,
            exit_layer,
            kept,
            flops,
            key.prune_layers,
            self._coefficients,
            early_exit=key.early_exit,
            backend=backend,
        )

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        knobs: ResolvedKnobs,
    ) -> MagicPyramidOutput:
        """Run validated ``(batch, seq)`` inputs, padded on either side, with ``knobs`` (``mp_model.engine.Engine``).

        Nothing is read back from the device.
        """
        self._sync_weights()
        batch, width = input_ids.shape
        config = self.parts.config
        layers = config.num_hidden_layers
        exit_schedule = knobs.exit_schedule
        key = PlanKey(
            batch=bucket(batch, self.batch_buckets),
            width=bucket(width, self.width_buckets),
            backend=choose_backend(knobs.backend, input_ids.device),
            prune_layers=knobs.prune_layers,
            early_exit=knobs.early_exit and layers > 1,
            scheduled=exit_schedule is not None,
        )
        plan = self._plan(key)
        types = token_type_ids is not None
        sources = (input_ids, attention_mask, token_type_ids) if types else (input_ids, attention_mask)
        if (batch, width) == (key.batch, key.width):
            torch.stack(sources, out=plan.inputs[: len(sources)])
            if not types:
                plan.inputs[2].zero_()
        else:
            plan.inputs.zero_()
            plan.inputs[: len(sources), :batch, :width].copy_(torch.stack(sources))
        if exit_schedule is not None:
            plan.schedule[:batch].copy_(exit_schedule)
        values = (knobs.tau, knobs.thresholds)
        if values != plan.knobs:
            plan.tau.fill_(knobs.tau)
            plan.thresholds.copy_(torch.tensor(knobs.thresholds, dtype=torch.float64))
            plan.knobs = values
        if plan.graph is not None:
            plan.graph.replay()
        else:
            self._static_forward(plan)
        exit_layer, flops, kept, logits = output_views(
            plan.outputs.clone(), key.batch, layers, config.num_labels, self._parameters[0].dtype
        )
        return MagicPyramidOutput(
            logits=logits[:batch], exit_layer=exit_layer[:batch], kept_tokens=kept.T[:batch], flops=flops[:batch]
        )

    # ------------------------------------------------------------------------------------------- capture
    def warm_up(
        self, batch_sizes: Sequence[int], max_length: int, knobs: ResolvedKnobs, *, exit_schedule: bool = False
    ) -> dict[str, Any]:
        """Capture ahead of time the graphs of these batch sizes at every width bucket up to ``max_length``, for the
        structure of ``knobs`` (its pruning layers and ``early_exit``) and, with ``exit_schedule``, a replayed
        schedule (``knobs.exit_schedule`` is not read).

        Returns ``stats()``.
        """
        device = self._parameters[0].device
        widths = sorted({bucket(w, self.width_buckets) for w in self.width_buckets if w < max_length})
        widths.append(bucket(max_length, self.width_buckets))
        for size in sorted({bucket(b, self.batch_buckets) for b in batch_sizes}):
            schedule = torch.zeros(size, dtype=torch.int64, device=device) if exit_schedule else None
            for width in widths:
                ids = torch.ones(size, width, dtype=torch.int64, device=device)
                self(ids, torch.ones_like(ids), None, replace(knobs, exit_schedule=schedule))
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Plans held, CUDA graphs captured, GPU memory they hold (bytes) and total capture time (s)."""
        plans = list(self._plans.values())
        return {
            "plans": len(plans),
            "graphs": sum(p.graph is not None for p in plans),
            "graph_memory_bytes": sum(p.memory_bytes for p in plans),
            "capture_s": sum(p.capture_s for p in plans),
            "buckets": [[p.key.batch, p.key.width] for p in plans],
        }

    def reset(self) -> None:
        """Drop every plan and graph (their memory returns to the pool)."""
        self._plans.clear()
