"""Encoder layers of a lone sequence run by ONNX Runtime: the packed path's low-overhead CPU runner.

At batch 1 on a CPU the packed path's time is the projections' GEMMs and the operators between them
(``bench/NOTES.md``, "CPU path"): ONNX Runtime's MLAS GEMMs on weights it packs at load, its fused
``SkipLayerNormalization`` and ``BiasGelu``, and one session call instead of 25-45 PyTorch operators a layer, run
the same layers faster. ``OrtLayers`` holds, per model, one ``InferenceSession`` for each graph
(``mp_model.ort_graph``) the packed path asks for, built on first use:

* a sequence alone from its token ids (batch size 1) runs to its exit in one call: all layers, with the
  sub-classifiers and the exit test inside the graph where exits are on (``run_to_exit``);
* a sequence left alone in a batch (the others exited) at a later layer runs one layer per call where exits are
  on, the exit test on the host, or all remaining layers in one call where they are off (``run``): a run to the
  exit per starting layer would hold a copy of the remaining weights each.

Sessions are kept per model, one per graph asked for (its kind, first layer, pruning layers and thread count: a
handful in serving), until one of the model's parameters changes (data pointer or version counter, as
``packed_path_weights`` checks its fused Q/K/V weights, which the graphs take). A session is loaded from a graph
saved with its weights as external data: loaded from serialized bytes instead, a whole-model session held about
4 GB more on BERT-base (``bench/NOTES.md``). Apart from the embedding tables, which they read in place, sessions
hold a copy of the weights and ORT's packed copy of each GEMM's. Their worker threads do not spin: a model holds
several sessions, run in turn. Needs ``onnx`` and ``onnxruntime`` (dependencies of the package;
``available()`` says whether they import).
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mp_model.engine import ModelParts
from mp_model.fused_weights import packed_path_weights, source_key
from mp_model.knobs import ResolvedKnobs
from mp_model.ort_graph import BIAS_ACTIVATIONS, GraphBuilder, LayerSource, ModelSource, RunKey, takes_knobs

# The graph's exit test ``(tau, exit_after)`` that never passes: the ``knobs`` input's encoding of "no exit".
NEVER = (-1.0, -1)


@functools.cache
def available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def supports(model: ModelParts, device: torch.device) -> bool:
    """Whether ``OrtLayers`` can run ``model`` (the model or its ``ModelParts``) on inputs on ``device``: float32
    weights on a CPU, an activation ORT fuses, and ``onnx``/``onnxruntime`` installed."""
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
class RunOutput:
    """What a run of layers returns: the remaining tokens' hidden states ``(m, d)``, the token count after each
    layer ``(stop - start,)`` int64, the last layer's sub-classifier logits ``(1, labels)`` and their uncertainty
    (``entropy_exit``'s), and the main classifier's logits ``(1, labels)`` (None where not asked for)."""

    hidden: torch.Tensor
    counts: torch.Tensor
    exit_logits: torch.Tensor | None
    uncertainty: np.float32 | None
    logits: torch.Tensor | None


@dataclass
class LoneResult:
    """What a lone sequence's remaining layers gave, from layer ``start`` on.

    Attributes:
        logits: ``(1, labels)`` float32, of the sub-classifier it exited at or of the main classifier.
        exit_layer: the layers it ran in all.
        counts: ``(layers - start,)`` int64, the tokens kept after each layer (0 after the exit).
        exit_logits: ``(layers - 1 - start, labels)`` float32, each sub-classifier's logits (NaN after the exit);
            None where the sub-classifiers did not run.
    """

    logits: torch.Tensor
    exit_layer: int
    counts: torch.Tensor
    exit_logits: torch.Tensor | None


@dataclass(eq=False)
class OrtLayers:
    """ONNX Runtime sessions of a model's graphs (see the module docstring); each is built on first use.

    ``source`` is the model as the graphs see it; ``parameters`` are the model's parameters the graphs copy and
    ``key`` their data pointers and versions when built (``ort_layers`` rebuilds on a change); ``shared`` keeps
    alive the ``OrtValue`` views of the embedding tables, which the sessions read in place instead of copying.
    """

    source: ModelSource
    parameters: list[torch.Tensor]
    key: tuple[int, ...]
    sessions: dict[RunKey, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_count(self) -> int:
        return len(self.source.layers)

    def run(
        self,
        start: int,
        stop: int,
        inputs: torch.Tensor | tuple[np.ndarray, np.ndarray],
        knobs: ResolvedKnobs,
        exit_head: bool,
    ) -> RunOutput:
        """Layers ``[start, stop)`` on one sequence, then the main classifier if ``stop`` is the last layer.

        ``inputs``: the hidden states ``(n, d)`` float32 entering layer ``start``, or, with ``start == 0``, the token
        ids and token type ids ``(n,)`` int64 numpy arrays (the embeddings run in the session).
        ``knobs``: the call's knobs, of which layers ``[start, stop)``'s scaled thresholds and pruning layers are
        read (the exit test, if any, is the caller's). ``exit_head``: also run layer ``stop - 1``'s sub-classifier
        (there must be one).
        """
        classify = stop == self.layer_count
        embed, threads = isinstance(inputs, tuple), torch.get_num_threads()
        key = RunKey(start, stop, knobs.prune_layers[start:stop], embed, exit_head, classify, False, threads)
        outputs = self._session(key).run(None, _feeds(key, inputs, knobs.thresholds[start:stop], NEVER))
        head, uncertainty = (torch.from_numpy(outputs[2]), outputs[3][0]) if exit_head else (None, None)
        logits = torch.from_numpy(outputs[-1]) if classify else None
        return RunOutput(torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]), head, uncertainty, logits)

    def run_to_exit(
        self, inputs: tuple[np.ndarray, np.ndarray], knobs: ResolvedKnobs, exit_after: int | None
    ) -> LoneResult:
        """Every layer on one sequence given by its token ids and token type ids ``(n,)`` int64, each but the last
        followed by its sub-classifier and the exit test, in one session call, with the call's ``knobs``.

        With ``knobs.early_exit`` the sequence leaves after the first layer whose sub-classifier's uncertainty is at
        most ``knobs.tau`` (``entropy_exit``'s rule, in float32), or, given ``exit_after`` (a replayed schedule),
        after that layer; without it, it never leaves (every sub-classifier still runs).
        """
        key = RunKey(0, self.layer_count, knobs.prune_layers, True, False, True, True, torch.get_num_threads())
        if not knobs.early_exit:
            test = NEVER
        else:
            test = (knobs.tau, NEVER[1]) if exit_after is None else (NEVER[0], exit_after)
        feeds = _feeds(key, inputs, knobs.thresholds, test)
        logits, exit_layer, counts, exit_logits = self._session(key).run(None, feeds)
        return LoneResult(
            torch.from_numpy(logits), int(exit_layer[0]), torch.from_numpy(counts), torch.from_numpy(exit_logits)
        )

    def _session(self, key: RunKey) -> Any:
        """The session of ``key``, built on first use."""
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = _new_session(self, key)
        return session


def _feeds(
    key: RunKey,
    inputs: torch.Tensor | tuple[np.ndarray, np.ndarray],
    thresholds: tuple[float, ...],
    test: tuple[float, int],
) -> dict[str, Any]:
    """The inputs of the session of ``key``: the token ids and token type ids or the hidden states, and the graph's
    ``knobs`` input (the exit ``test`` as ``(tau, exit_after)``, then the thresholds) where the graph takes it
    (``mp_model.ort_graph``)."""
    if isinstance(inputs, tuple):
        feeds = {"input_ids": inputs[0], "token_type_ids": inputs[1]}
    else:
        feeds = {"hidden": inputs.detach().numpy()}
    if takes_knobs(key):
        feeds["knobs"] = np.array([*test, *thresholds], dtype=np.float32)
    return feeds


_CACHE: weakref.WeakKeyDictionary[nn.Module, OrtLayers] = weakref.WeakKeyDictionary()


def ort_layers(model: ModelParts) -> OrtLayers:
    """``model``'s ``OrtLayers`` (the model or its ``ModelParts``), built anew when one of its parameters changed
    since: data pointer or version counter, as ``packed_path_weights`` checks its own (the pruning thresholds come
    with each call's knobs)."""
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
    parameters = [*bert.parameters(), *model.exits.parameters(), *model.classifier.parameters()]
    cached = _CACHE[model] = OrtLayers(source, parameters, source_key(parameters))
    return cached


def _new_session(layers: OrtLayers, key: RunKey) -> Any:
    """An ``InferenceSession`` of the graph of ``key`` on the CPU, with ``key.threads`` intra-op threads, loaded
    from a temporary file with the weights as external data (module docstring)."""
    import onnx
    import onnxruntime

    builder = GraphBuilder(layers.source, key)
    graph = builder.build()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = key.threads
    options.inter_op_num_threads = 1
    # A model holds several sessions (one per setting), run in turn: the spinning worker threads of idle ones would
    # take the cores from the running one (bench/NOTES.md, "CPU path").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, tensor in builder.in_place.items():
        if name not in layers.shared:
            layers.shared[name] = onnxruntime.OrtValue.ortvalue_from_numpy(tensor.detach().numpy())
        options.add_initializer(name, layers.shared[name])
    # ORT maps the weights file: where an open file cannot be removed (Windows), the folder outlives the session.
    with tempfile.TemporaryDirectory(prefix="mp-ort-", ignore_cleanup_errors=True) as folder:
        path = Path(folder) / "graph.onnx"
        onnx.save_model(
            graph,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="weights.bin",
            size_threshold=1024,
        )
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
