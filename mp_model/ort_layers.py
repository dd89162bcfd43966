"""A lone sequence's remaining encoder layers run by ONNX Runtime: the packed path's low-overhead CPU runner.

At batch 1 on a CPU the packed path's time is the projections' GEMMs and the operators between them
(``bench/NOTES.md``, "CPU path"): ONNX Runtime's MLAS GEMMs on weights it packs at load, its fused
``SkipLayerNormalization`` and ``BiasGelu``, and one session call instead of 25-45 PyTorch operators a layer,
run the same layers faster. ``OrtLayers`` holds, per model, one ``InferenceSession`` for each graph
(``mp_model.ort_graph``) the packed path asks for: the whole model on one sequence's token ids, with the
sub-classifiers and the exit test inside the graph, so that one call runs a sequence to its exit or to the main
classifier.

Sessions are built on first use and kept per model until one of its parameters changes (data pointer or version
counter, as ``packed_path_weights`` checks its fused Q/K/V weights, which the graphs take); apart from the
embedding tables, which they read in place, they hold a copy of the weights (and ORT's packed copy of each
GEMM's). Their worker threads do not spin: a model holds several sessions (one per setting), run in turn.
Needs ``onnx`` and ``onnxruntime`` (dependencies of the package; ``available()`` says whether they import).
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mp_model.flops import FlopsShape
from mp_model.fused_weights import packed_path_weights, source_key
from mp_model.ort_graph import BIAS_ACTIVATIONS, GraphBuilder, GraphKey, LayerSource, ModelSource

if TYPE_CHECKING:
    from mp_model.modeling import MagicPyramidForSequenceClassification


@functools.cache
def available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def supports(model: MagicPyramidForSequenceClassification, device: torch.device) -> bool:
    """Whether ``OrtLayers`` can run ``model`` on inputs on ``device``: float32 weights on a CPU, an activation ORT
    fuses, and ``onnx``/``onnxruntime`` installed."""
    activation = model.config.hidden_act
    parameter = model.bert.embeddings.word_embeddings.weight
    return (
        device.type == "cpu"
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and isinstance(activation, str)
        and activation in BIAS_ACTIVATIONS
        and available()
    )


@dataclass
class LoneResult:
    """What a lone sequence's remaining layers gave.

    Attributes:
        logits: ``(1, labels)`` float32, of the sub-classifier it exited at or of the main classifier.
        exit_layer: ``(1,)`` int64, the layers it ran in all.
        counts: ``(layers,)`` int64, the tokens kept after each layer (0 after the exit).
        exit_logits: ``(layers - 1, labels)`` float32, each sub-classifier's logits (NaN after the exit); None
            where the sub-classifiers did not run.
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    counts: torch.Tensor
    exit_logits: torch.Tensor | None = None


@dataclass(eq=False)
class OrtLayers:
    """ONNX Runtime sessions of a model's graphs (see the module docstring); ``run`` builds each on first use.

    ``source`` is the model as the graphs see it, ``shape`` its config's fields for FLOPs counts; ``parameters``
    are the parameters the graphs copy and ``key`` their data pointers and versions when built (``ort_layers``
    rebuilds on a change); ``shared`` keeps alive the ``OrtValue`` views of the embedding tables, which the
    sessions read in place instead of copying.
    """

    source: ModelSource
    shape: FlopsShape
    parameters: list[torch.Tensor]
    key: tuple[int, ...]
    sessions: dict[GraphKey, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def run(
        self,
        input_ids: np.ndarray,
        token_type_ids: np.ndarray,
        thresholds: list[float],
        *,
        tau: float,
        early_exit: bool,
        exit_after: int | None,
        return_exit_logits: bool,
    ) -> LoneResult:
        """The model on one sequence's token ids and token type ids ``(n,)`` int64 (C-contiguous), in one session
        call.

        ``thresholds``: each layer's pruning threshold (already scaled; ``<= 0``: the layer does not prune). With
        ``early_exit`` the sequence leaves after the first layer whose sub-classifier's uncertainty is at most
        ``tau`` (``entropy_exit``'s rule, in float32), or, given ``exit_after`` (a replayed schedule), after that
        layer. ``return_exit_logits`` runs every sub-classifier also without ``early_exit``.
        """
        prunes = tuple(t > 0.0 for t in thresholds)
        key = GraphKey(prunes, early_exit or return_exit_logits, torch.get_num_threads())
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = self._session(key)
        feeds = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        if any(prunes):
            feeds["thresholds"] = np.asarray(thresholds, dtype=np.float32)
        if key.exit_test:  # -1 never passes: the uncertainty lies in [0, 1] (or is NaN), layers count from 1
            entropy = early_exit and exit_after is None
            feeds["tau"] = np.array([tau if entropy else -1.0], dtype=np.float32)
            feeds["exit_after"] = np.array([exit_after if early_exit and not entropy else -1], dtype=np.int64)
        outputs = session.run(None, feeds)
        return LoneResult(*map(torch.from_numpy, outputs[:3]), torch.from_numpy(outputs[3]) if key.heads else None)

    def _session(self, key: GraphKey) -> Any:
        """An ``InferenceSession`` of the graph of ``key`` on the CPU, with ``key.threads`` intra-op threads."""
        import onnxruntime

        builder = GraphBuilder(self.source, key)
        graph = builder.build()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = key.threads
        options.inter_op_num_threads = 1
        # A model holds several sessions (one per setting), run in turn: the spinning worker threads of idle ones
        # would take the cores from the running one (bench/NOTES.md, "CPU path").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, tensor in builder.in_place.items():
            if name not in self.shared:
                self.shared[name] = onnxruntime.OrtValue.ortvalue_from_numpy(tensor.detach().numpy())
            options.add_initializer(name, self.shared[name])
        return onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


_CACHE: weakref.WeakKeyDictionary[nn.Module, OrtLayers] = weakref.WeakKeyDictionary()


def ort_layers(model: MagicPyramidForSequenceClassification) -> OrtLayers:
    """``model``'s ``OrtLayers``, built anew when one of its parameters (but the pruning thresholds, read on each
    call) changed since: data pointer or version counter, as ``packed_path_weights`` checks its own."""
    cached = _CACHE.get(model)
    if cached is not None and cached.key == source_key(cached.parameters):
        return cached
    config = model.config
    exits = [*model.exits, None]
    layers = [
        LayerSource(projections, layer.attention.output.LayerNorm, layer.output.LayerNorm, exits[index])
        for index, (projections, layer) in enumerate(
            zip(packed_path_weights(model).layers, model.bert.encoder.layer, strict=True)
        )
    ]
    bert = model.bert
    source = ModelSource(
        layers,
        bert.embeddings,
        bert.pooler.dense,
        model.classifier,
        config.num_attention_heads,
        config.hidden_act,
        config.num_labels,
    )
    parameters = [p for name, p in model.named_parameters() if name != "thresholds"]
    cached = _CACHE[model] = OrtLayers(source, FlopsShape.of(config), parameters, source_key(parameters))
    return cached
