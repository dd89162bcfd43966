"""Weights derived from a model's projections, rebuilt when the parameters change.

* ``FusedWeights`` and ``refresh_fused_qkv``: each layer's Q, K and V projections fused into one ``(3d, d)``
  matrix and ``(3d,)`` bias, refreshed in place when a projection's ``_version`` changes (the graph engine and the
  packed path both multiply by them: one matmul instead of three).
* ``packed_path_weights(model)``: the four projections of every layer as the packed path runs them
  (``Projection``), cached per model. On a CPU in float32 each also holds a copy of its weight pre-packed in
  oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), which ``Projection`` multiplies by when
  the input has at most ``PREPACKED_MAX_ROWS`` rows, with the bias, GELU or the residual add fused into the same
  call. Measured on one core (``bench/NOTES.md``, "CPU path"): 0.54-0.79x the time of ``F.linear`` for
  BERT-base's projections at 8-32 rows, 0.87-0.97x for MiniLM's, the same from 256 rows up, where ``F.linear``
  runs. The pre-packed copies double the memory of the encoder's projection weights.

The cache is keyed by the model object (a weak reference: it goes with the model) and checked on every call
against the data pointers and ``_version`` counters of the weights it was built from, so that training steps,
``load_state_dict`` and moving the model rebuild it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mp_model.engine import ModelParts

# Inputs with more rows run ``F.linear`` on the original weight: from here up the pre-packed weight gains nothing.
PREPACKED_MAX_ROWS = 256
# The oneDNN packing's row count hint (it picks the blocked layout; any row count works).
PREPACK_ROWS_HINT = 32
# ``config.hidden_act`` -> oneDNN post-op (name, algorithm) that computes the same function.
ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh")}


@dataclass
class FusedWeights:
    """Per-layer Q, K, V projections fused into one ``(3d, d)`` matrix, refreshed in place when they change."""

    weight: list[torch.Tensor] = field(default_factory=list)
    bias: list[torch.Tensor] = field(default_factory=list)
    versions: tuple[int, ...] = ()


def qkv_projections(model: ModelParts) -> list[tuple[nn.Linear, nn.Linear, nn.Linear]]:
    """Each layer's ``(query, key, value)`` projections."""
    return [(a.query, a.key, a.value) for a in (layer.attention.self for layer in model.bert.encoder.layer)]


def refresh_fused_qkv(
    fused: FusedWeights,
    projections: Sequence[tuple[nn.Linear, nn.Linear, nn.Linear]],
    versions: tuple[int, ...] | None = None,
) -> None:
    """Refresh ``fused`` in place from ``projections`` (``qkv_projections``) if they changed since.

    ``versions`` are the ``_version`` counters of every projection's weight and bias, in order (computed here when
    None; callers that keep the tensors' list pass them).
    """
    if versions is None:
        versions = tuple(p._version for trio in projections for m in trio for p in (m.weight, m.bias))
    if versions == fused.versions:
        return
    # Normal tensors even under ``torch.inference_mode``: a later refresh outside it updates them in place.
    with torch.inference_mode(False), torch.no_grad():
        for index, trio in enumerate(projections):
            weight = torch.cat([m.weight for m in trio])
            bias = torch.cat([m.bias for m in trio])
            if index < len(fused.weight):
                fused.weight[index].copy_(weight)
                fused.bias[index].copy_(bias)
            else:
                fused.weight.append(weight)
                fused.bias.append(bias)
    fused.versions = versions


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` ``(out, in)`` in oneDNN's blocked layout, or None where oneDNN cannot run it (not a float32 CPU
    tensor, no oneDNN in this torch build)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREPACK_ROWS_HINT)
    except (RuntimeError, AttributeError):
        return None


@dataclass
class Projection:
    """``x @ weight.T + bias`` ``(rows, in) -> (rows, out)``, optionally followed by ``activation`` or plus a
    ``residual`` ``(rows, out)``, through the pre-packed weight when there is one and ``x`` has few rows.

    ``onednn_activation`` is the fused post-op of ``activation`` (None: applied apart).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    prepacked: torch.Tensor | None = None
    activation: object = None
    onednn_activation: tuple[str, str] | None = None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.prepacked is not None and x.shape[0] <= PREPACKED_MAX_ROWS:
            linear = torch.ops.mkldnn._linear_pointwise
            if residual is not None:
                return linear.binary(x, residual, self.prepacked, self.bias, "add")
            if self.activation is None:
                return linear(x, self.prepacked, self.bias, "none", [], "")
            if self.onednn_activation is not None:
                name, algorithm = self.onednn_activation
                return linear(x, self.prepacked, self.bias, name, [], algorithm)
            return self.activation(linear(x, self.prepacked, self.bias, "none", [], ""))
        y = F.linear(x, self.weight, self.bias)
        if residual is not None:
            return y.add_(residual)
        return y if self.activation is None else self.activation(y)


@dataclass
class LayerProjections:
    """One encoder layer's projections: fused Q/K/V, attention output (+ residual), intermediate (+ activation),
    output (+ residual)."""

    qkv: Projection
    attention_output: Projection
    intermediate: Projection
    output: Projection


@dataclass
class PackedPathWeights:
    """The packed path's projections of every layer, the parameters they derive from and those parameters' key."""

    layers: list[LayerProjections]
    sources: list[torch.Tensor]
    key: tuple[int, ...]


_CACHE: weakref.WeakKeyDictionary[nn.Module, PackedPathWeights] = weakref.WeakKeyDictionary()


def source_key(sources: list[torch.Tensor]) -> tuple[int, ...]:
    """Data pointers and version counters of ``sources`` (about 15 us for BERT-base's 144 tensors)."""
    return (*map(torch.Tensor.data_ptr, sources), *(p._version for p in sources))


def _layer_sources(model: ModelParts) -> list[torch.Tensor]:
    """Weight and bias of every projection of the encoder, in layer order."""
    sources = []
    for layer in model.bert.encoder.layer:
        a = layer.attention.self
        for m in (a.query, a.key, a.value, layer.attention.output.dense, layer.intermediate.dense, layer.output.dense):
            sources += (m.weight, m.bias)
    return sources


def packed_path_weights(model: ModelParts) -> PackedPathWeights:
    """``model``'s projections for the packed path (see the module docstring), rebuilt when a weight changed."""
    cached = _CACHE.get(model)
    if cached is not None and cached.key == source_key(cached.sources):
        return cached
    sources = _layer_sources(model)
    fused = FusedWeights()
    refresh_fused_qkv(fused, qkv_projections(model))
    activation = model.config.hidden_act
    onednn_activation = ONEDNN_ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    layers = []
    for index, layer in enumerate(model.bert.encoder.layer):
        act = layer.intermediate.intermediate_act_fn
        attention_output, intermediate = layer.attention.output.dense, layer.intermediate.dense
        output = layer.output.dense
        projections = {
            "qkv": (fused.weight[index], fused.bias[index], None, None),
            "attention_output": (attention_output.weight, attention_output.bias, None, None),
            "intermediate": (intermediate.weight, intermediate.bias, act, onednn_activation),
            "output": (output.weight, output.bias, None, None),
        }
        layers.append(
            LayerProjections(
                **{
                    name: Projection(weight.detach(), bias.detach(), _prepack(weight), fn, fused_act)
                    for name, (weight, bias, fn, fused_act) in projections.items()
                }
            )
        )
    cached = PackedPathWeights(layers, sources, source_key(sources))
    _CACHE[model] = cached
    return cached
