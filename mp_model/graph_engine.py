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
* ``compact_tokens`` packs the padded embeddings, prunes tokens and drops exited slots (1-2 launches, counts in
  device memory), ``exit_step`` pools, classifies, tests and records the exits (1 launch);
* the knobs ``tau`` and ``threshold_scale`` are copied into device tensors before each replay, so one captured
  graph serves any setting; only the set of layers that prune (thresholds above 0) and the switches
  ``prune`` / ``early_exit`` / ``exit_schedule`` select another graph;
* FLOPs come from the outputs (``mp_model.flops.flops_from_outputs``), as on the packed path.

On CUDA with the Triton backend each bucket's forward is captured once into a ``torch.cuda.CUDAGraph`` (all
graphs share one memory pool; at most ``max_graphs`` are kept, least recently used dropped) and replayed; on the
CPU, or with ``use_graphs=False``, the same static forward runs eagerly. When every sequence has exited, the
remaining layers still launch their kernels, which return at once (a few microseconds each).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mp_kernels import add_layer_norm, compact_tokens, exit_step, rows_linear, varlen_attention
from mp_kernels.dispatch import choose_backend
from mp_model.config import check_thresholds
from mp_model.flops import flops_from_outputs
from mp_model.fused_weights import FusedWeights, refresh_fused_qkv
from mp_model.outputs import MagicPyramidOutput

if TYPE_CHECKING:
    from mp_model.modeling import MagicPyramidForSequenceClassification

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
    """Static input, knob and output tensors of one bucket, and its CUDA graph (None when run eagerly)."""

    key: PlanKey
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    schedule: torch.Tensor
    tau: torch.Tensor
    thresholds: torch.Tensor
    padded_cu: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] | None = None
    memory_bytes: int = 0
    capture_s: float = 0.0
    knobs: tuple[Any, ...] = ()


class GraphEngine:
    """Sync-free, bucketed forward of a ``MagicPyramidForSequenceClassification``; see the module docstring.

    Args:
        model: the model (its current device and dtype are used; moving it invalidates the graphs, which are
            recaptured on next use).
        use_graphs: capture CUDA graphs (default: on CUDA with the Triton backend).
        batch_buckets, width_buckets: the bucket sizes (inputs are padded up; a size past the largest bucket
            gets a bucket of its own).
        max_graphs: most graphs kept at once.
    """

    def __init__(
        self,
        model: MagicPyramidForSequenceClassification,
        *,
        use_graphs: bool | None = None,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        width_buckets: Sequence[int] = DEFAULT_WIDTH_BUCKETS,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
    ) -> None:
        activation = model.config.hidden_act
        if activation not in ACTIVATIONS:
            raise ValueError(f"the graph engine supports hidden_act in {sorted(ACTIVATIONS)}, got {activation!r}")
        self.model = model
        self.activation = ACTIVATIONS[activation]
        self.use_graphs = use_graphs
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.width_buckets = tuple(sorted(w for w in width_buckets if w <= model.config.max_position_embeddings))
        self.max_graphs = max_graphs
        self._plans: OrderedDict[PlanKey, Plan] = OrderedDict()
        self._fused = FusedWeights()
        self._pointers: tuple[int, ...] = ()
        self._thresholds_seen: tuple[int, int] = (-1, -1)
        self._host_thresholds: list[float] = []
        self._pool: Any = None
        self._parameters = list(model.parameters())
        self._projections = [
            (a.query, a.key, a.value) for a in (layer.attention.self for layer in model.bert.encoder.layer)
        ]
        self._projection_tensors = [p for trio in self._projections for m in trio for p in (m.weight, m.bias)]

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

    def _prune_layers(self, prune: bool, threshold_scale: float) -> tuple[bool, ...]:
        """Which layers prune: ``threshold * scale > 0`` (thresholds read back only when they change).

        When pruning, a NaN or infinite learned threshold raises a ``ValueError`` (checked on the host copy).
        """
        thresholds = self.model.thresholds
        seen = (thresholds.data_ptr(), thresholds._version)
        if seen != self._thresholds_seen:
            self._host_thresholds = thresholds.detach().double().cpu().tolist()
            self._thresholds_seen = seen
        if prune:
            check_thresholds(self._host_thresholds, "thresholds")
        return tuple(prune and t * threshold_scale > 0.0 for t in self._host_thresholds)

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
        device = self.model.thresholds.device
        layers = self.model.config.num_hidden_layers
        shape = (key.batch, key.width)
        score_dtype = torch.float64 if self.model.dtype == torch.float64 else torch.float32
        plan = Plan(
            key=key,
            input_ids=torch.zeros(shape, dtype=torch.int64, device=device),
            attention_mask=torch.zeros(shape, dtype=torch.bool, device=device),
            token_type_ids=torch.zeros(shape, dtype=torch.int64, device=device),
            schedule=torch.zeros(key.batch, dtype=torch.int64, device=device),
            tau=torch.zeros(1, dtype=torch.float32, device=device),
            thresholds=torch.zeros(layers, dtype=score_dtype, device=device),
            padded_cu=torch.arange(0, key.batch * key.width + 1, key.width, dtype=torch.int32, device=device),
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
        device = plan.input_ids.device
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
            plan.outputs = self._static_forward(plan)
        plan.graph = graph
        plan.memory_bytes = torch.cuda.memory_allocated(device) - before
        plan.capture_s = time.perf_counter() - started

    # --------------------------------------------------------------------------------------------- forward
    def _static_forward(self, plan: Plan) -> tuple[torch.Tensor, ...]:
        """The forward pass on the plan's static tensors: shapes fixed by the bucket, no host read.

        Returns ``logits (B, classes)``, ``exit_layer (B,)``, ``kept_tokens (B, layers)``, ``flops (B,)``.
        """
        model, key = self.model, plan.key
        config, bert = model.config, model.bert
        batch, width, backend = key.batch, key.width, key.backend
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        capacity = batch * width
        embeddings = bert.embeddings(input_ids=plan.input_ids, token_type_ids=plan.token_type_ids)
        lengths = plan.attention_mask.sum(dim=1)
        alive = lengths > 0
        keep = plan.attention_mask.view(-1)
        hidden, cu = compact_tokens(
            embeddings.view(capacity, -1), plan.padded_cu, width, keep=keep, backend=backend, validate=False
        )
        logits = torch.zeros(batch, config.num_labels, dtype=hidden.dtype, device=hidden.device)
        exit_layer = torch.full((batch,), layers, dtype=torch.int64, device=hidden.device)
        kept = torch.zeros(layers, batch, dtype=torch.int64, device=hidden.device)
        schedule = plan.schedule if key.scheduled else None
        for index, layer in enumerate(bert.encoder.layer):
            rows = cu[-1:]
            qkv = rows_linear(hidden, self._fused.weight[index], self._fused.bias[index], rows, backend=backend)
            q, k, v = qkv.view(capacity, 3, heads, head_dim).unbind(1)
            prunes = key.prune_layers[index]
            result = varlen_attention(q, k, v, cu, width, return_importance=prunes, backend=backend, validate=False)
            context, importance = result if prunes else (result, None)
            block = layer.attention.output
            attended = rows_linear(
                context.view(capacity, -1), block.dense.weight, block.dense.bias, rows, backend=backend
            )
            norm = block.LayerNorm
            attended = add_layer_norm(attended, hidden, norm.weight, norm.bias, norm.eps, rows, backend=backend)
            if prunes:
                threshold = plan.thresholds[index : index + 1]
                attended, cu = compact_tokens(
                    attended,
                    cu,
                    width,
                    importance=importance,
                    threshold=threshold,
                    keep_first=True,
                    counts=kept[index],
                    backend=backend,
                    validate=False,
                )
                rows = cu[-1:]
            else:
                kept[index].copy_(cu[1:] - cu[:-1])
            dense = layer.intermediate.dense
            inner = rows_linear(attended, dense.weight, dense.bias, rows, activation=self.activation, backend=backend)
            out = layer.output
            hidden = rows_linear(inner, out.dense.weight, out.dense.bias, rows, backend=backend)
            norm = out.LayerNorm
            hidden = add_layer_norm(hidden, attended, norm.weight, norm.bias, norm.eps, rows, backend=backend)
            if key.early_exit and index < layers - 1:
                head = model.exits[index]
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
                    backend=backend,
                )
                hidden, cu = compact_tokens(hidden, cu, width, alive=alive, backend=backend, validate=False)
        first = cu[:-1].long().clamp(max=capacity - 1)
        pooled = bert.pooler.activation(bert.pooler.dense(hidden.index_select(0, first)))
        logits = torch.where(alive[:, None], model.classifier(pooled), logits)
        kept_tokens = kept.T
        flops = flops_from_outputs(config, lengths, kept_tokens, exit_layer, early_exit=key.early_exit)
        return logits, exit_layer, kept_tokens, flops

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        *,
        tau: float,
        threshold_scale: float,
        prune: bool,
        early_exit: bool,
        exit_schedule: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> MagicPyramidOutput:
        """Run validated ``(batch, seq)`` inputs (as ``MagicPyramidForSequenceClassification.forward``).

        Nothing is read back from the device, except the model's pruning thresholds after they change.
        """
        self._sync_weights()
        batch, width = input_ids.shape
        layers = self.model.config.num_hidden_layers
        key = PlanKey(
            batch=bucket(batch, self.batch_buckets),
            width=bucket(width, self.width_buckets),
            backend=choose_backend(backend, input_ids.device),
            prune_layers=self._prune_layers(prune, threshold_scale),
            early_exit=early_exit and layers > 1,
            scheduled=exit_schedule is not None,
        )
        plan = self._plan(key)
        exact = (batch, width) == (key.batch, key.width)
        for name, source in (
            ("input_ids", input_ids),
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
        ):
            target = getattr(plan, name)
            if source is None or not exact:
                target.zero_()
            if source is not None:
                target[:batch, :width].copy_(source)
        if exit_schedule is not None:
            plan.schedule[:batch].copy_(exit_schedule)
        knobs = (tau, threshold_scale, self._thresholds_seen)
        if knobs != plan.knobs:
            plan.tau.fill_(tau)
            plan.thresholds.copy_(self.model.thresholds.detach().double() * threshold_scale)
            plan.knobs = knobs
        if plan.graph is not None:
            plan.graph.replay()
            outputs = plan.outputs
        else:
            outputs = self._static_forward(plan)
        logits, exit_layer, kept_tokens, flops = (t[:batch].clone() for t in outputs)
        return MagicPyramidOutput(logits=logits, exit_layer=exit_layer, kept_tokens=kept_tokens, flops=flops)

    # ------------------------------------------------------------------------------------------- capture
    def warm_up(
        self,
        batch_sizes: Sequence[int],
        max_length: int,
        *,
        prune: bool = True,
        early_exit: bool = True,
        exit_schedule: bool = False,
        threshold_scale: float = 1.0,
        backend: str | None = None,
    ) -> dict[str, Any]:
        """Capture ahead of time the graphs of these batch sizes at every width bucket up to ``max_length``.

        Returns ``stats()``.
        """
        device = self.model.thresholds.device
        widths = sorted({bucket(w, self.width_buckets) for w in self.width_buckets if w < max_length})
        widths.append(bucket(max_length, self.width_buckets))
        for size in sorted({bucket(b, self.batch_buckets) for b in batch_sizes}):
            for width in widths:
                ids = torch.ones(size, width, dtype=torch.int64, device=device)
                self(
                    ids,
                    torch.ones_like(ids),
                    None,
                    tau=0.0,
                    threshold_scale=threshold_scale,
                    prune=prune,
                    early_exit=early_exit,
                    exit_schedule=torch.zeros(size, dtype=torch.int64, device=device) if exit_schedule else None,
                    backend=backend,
                )
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
