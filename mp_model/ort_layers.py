"""Encoder layers of a lone sequence run by ONNX Runtime: the packed path's low-overhead CPU runner.

At batch 1 on a CPU the packed path's time is the projections' GEMMs and the operators between them
(``bench/NOTES.md``, "CPU path"): ONNX Runtime's MLAS GEMMs on weights it packs at load, its fused
``SkipLayerNormalization`` and ``BiasGelu``, and one session call per layer instead of 25-45 PyTorch operators,
run the same layer in about 0.8x the time. ``OrtLayers`` builds, per model, ONNX graphs of runs of consecutive
encoder layers from the model's own weights (``onnx.helper``, no export) and one ``InferenceSession`` for each
run the packed path asks for. A layer graph computes, for one sequence of ``n`` tokens ``x`` ``(n, d)``:

* attention: the fused Q/K/V projection, then, where the layer prunes, the probabilities explicitly (softmax of
  ``(q * scale) k^T``), the context, and each token's importance (the column mean of the probabilities over
  heads and rows, ``importance > threshold / n`` in float32 as ``prune_tokens``' caller computes it, the first
  token always kept); where it does not, ORT's fused ``Attention`` operator;
* the output projection plus residual and LayerNorm (``SkipLayerNormalization``);
* real removal: the rows of the kept tokens (``NonZero``, ``Gather``), so the feed-forward runs on them only;
* the feed-forward (``BiasGelu``, ``SkipLayerNormalization``);
* optionally the layer's sub-classifier on the mean of the remaining tokens (``(1, labels)`` logits) and the
  uncertainty the exit test compares with ``tau`` (``mp_kernels.entropy_exit``'s normalised entropy);
* after the last layer, the main classifier (pooler and output layer on the first token).

A run starting at the first layer may start from the token ids: the embeddings (word + token type + position,
LayerNorm) run in the session, reading the model's embedding tables in place (no copy). A run of layers without
sub-classifiers (the dense model, pruning only) is one session; with exits each layer is its own session, since
the exit test decides on the host whether the next one runs. Sessions are built on first use and kept per model
until one of its parameters changes (data pointer or version counter, as ``packed_path_weights`` checks its
fused Q/K/V weights, which the graphs take); apart from the embedding tables they hold a copy of the weights (and
ORT's packed copy of each GEMM's). Their worker threads do not spin: a model holds several sessions, run in turn.
Needs ``onnx`` and ``onnxruntime`` (dependencies of the package; ``available()`` says whether they import).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mp_model.fused_weights import LayerProjections, packed_path_weights, source_key

if TYPE_CHECKING:
    from mp_model.modeling import MagicPyramidForSequenceClassification

# ``config.hidden_act`` -> the ORT operator that applies it to ``x + bias``.
BIAS_ACTIVATIONS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu"}
OPSET = 17
MS_DOMAIN = "com.microsoft"


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


@dataclass(frozen=True)
class RunKey:
    """Which session: layers ``[start, stop)``, which of them prune, whether it starts from token ids (the
    embeddings run first), whether the last layer's sub-classifier runs, whether the main classifier follows
    (``stop`` is the last layer), and the intra-op thread count."""

    start: int
    stop: int
    prunes: tuple[bool, ...]
    embed: bool
    exit_head: bool
    classify: bool
    threads: int


@dataclass
class LayerSource:
    """What one encoder layer's graph is built from: its projections as the packed path runs them, its two
    LayerNorms, and its sub-classifier (None after the last layer)."""

    projections: LayerProjections
    attention_norm: nn.LayerNorm
    output_norm: nn.LayerNorm
    exit_head: nn.Module | None


@dataclass
class ModelParts:
    """The rest of the model the graphs use: the embeddings module, the pooler's dense layer (tanh follows) and the
    main classifier's output layer."""

    embeddings: nn.Module
    pooler: nn.Linear
    classifier: nn.Linear


@dataclass
class RunOutput:
    """What a run of layers returns: the remaining tokens' hidden states ``(m, d)``, the token count after each
    layer, the last layer's sub-classifier logits ``(1, labels)`` and their uncertainty (``entropy_exit``'s), and
    the main classifier's logits ``(1, labels)`` (None where not asked for)."""

    hidden: torch.Tensor
    counts: list[int]
    exit_logits: torch.Tensor | None
    uncertainty: float | None
    logits: torch.Tensor | None


@dataclass(eq=False)
class OrtLayers:
    """ONNX Runtime sessions for runs of a model's encoder layers (see the module docstring); ``run`` builds each
    session on first use.

    ``sources`` are the model's parameters the graphs copy and ``key`` their data pointers and versions when built
    (``ort_layers`` rebuilds on a change); ``shared`` keeps alive the ``OrtValue`` views of the embedding tables,
    which the sessions read in place instead of copying.
    """

    layers: list[LayerSource]
    parts: ModelParts
    heads: int
    hidden_act: str
    num_labels: int
    sources: list[torch.Tensor]
    key: tuple[int, ...]
    sessions: dict[RunKey, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def run(
        self,
        start: int,
        stop: int,
        inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        thresholds: list[float],
        exit_head: bool,
    ) -> RunOutput:
        """Layers ``[start, stop)`` on one sequence, then the main classifier if ``stop`` is the last layer.

        ``inputs``: the hidden states ``(n, d)`` float32 entering layer ``start``, or, with ``start == 0``, the token
        ids and token type ids ``(n,)`` int64 (the embeddings run in the session).
        ``thresholds``: each layer's pruning threshold (already scaled; ``<= 0``: the layer does not prune).
        ``exit_head``: also run layer ``stop - 1``'s sub-classifier (there must be one).
        """
        prunes = tuple(t > 0.0 for t in thresholds)
        embed = isinstance(inputs, tuple)
        classify = stop == len(self.layers)
        key = RunKey(start, stop, prunes, embed, exit_head, classify, torch.get_num_threads())
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = _session(self, key)
        if embed:
            feeds = {"input_ids": inputs[0].numpy(), "token_type_ids": inputs[1].numpy()}
        else:
            feeds = {"hidden": inputs.detach().numpy()}
        if any(prunes):
            feeds["thresholds"] = np.asarray(thresholds, dtype=np.float32)
        outputs = session.run(None, feeds)
        head, uncertainty = (torch.from_numpy(outputs[2]), float(outputs[3][0])) if exit_head else (None, None)
        logits = torch.from_numpy(outputs[-1]) if classify else None
        return RunOutput(torch.from_numpy(outputs[0]), outputs[1].tolist(), head, uncertainty, logits)


_CACHE: weakref.WeakKeyDictionary[nn.Module, OrtLayers] = weakref.WeakKeyDictionary()


def ort_layers(model: MagicPyramidForSequenceClassification) -> OrtLayers:
    """``model``'s ``OrtLayers``, built anew when one of its parameters (but the pruning thresholds, read on each
    call) changed since: data pointer or version counter, as ``packed_path_weights`` checks its own."""
    cached = _CACHE.get(model)
    if cached is not None and cached.key == source_key(cached.sources):
        return cached
    config = model.config
    exits = [*model.exits, None]
    sources = [
        LayerSource(projections, layer.attention.output.LayerNorm, layer.output.LayerNorm, exits[index])
        for index, (projections, layer) in enumerate(
            zip(packed_path_weights(model).layers, model.bert.encoder.layer, strict=True)
        )
    ]
    parts = ModelParts(model.bert.embeddings, model.bert.pooler.dense, model.classifier)
    parameters = [p for name, p in model.named_parameters() if name != "thresholds"]
    cached = OrtLayers(sources, parts, config.num_attention_heads, config.hidden_act, config.num_labels, parameters, ())
    cached.key = source_key(parameters)
    _CACHE[model] = cached
    return cached


def _session(layers: OrtLayers, key: RunKey) -> Any:
    """An ``InferenceSession`` of the graph of ``key`` on the CPU, with ``key.threads`` intra-op threads."""
    import onnxruntime

    builder = _GraphBuilder(layers, key)
    graph = builder.build()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = key.threads
    options.inter_op_num_threads = 1
    # A model holds several sessions (one per layer with exits, one per setting), run in turn: the spinning worker
    # threads of idle ones would take the cores from the running one (bench/NOTES.md, "CPU path").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, tensor in builder.in_place.items():
        if name not in layers.shared:
            layers.shared[name] = onnxruntime.OrtValue.ortvalue_from_numpy(tensor.detach().numpy())
        options.add_initializer(name, layers.shared[name])
    return onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


class _GraphBuilder:
    """Nodes and initializers of one run of layers (``RunKey``), named ``l<i>.<name>`` per layer."""

    def __init__(self, layers: OrtLayers, key: RunKey) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.layers, self.key = layers, key
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.shared_names: set[str] = set()
        # Initializers the session reads in place from these tensors (``_session``); the graph holds a one-row
        # placeholder of each.
        self.in_place: dict[str, torch.Tensor] = {}
        self.d = layers.layers[0].projections.attention_output.weight.shape[0]
        self.heads = layers.heads
        self.head_dim = self.d // self.heads

    def shared(self, name: str) -> str:
        """The graph-wide constant ``name`` (``axis0``, ``minus_one`` or ``heads``), added on first use."""
        if name not in self.shared_names:
            self.shared_names.add(name)
            values = {
                "axis0": np.array([0]),
                "minus_one": np.array([-1]),
                "heads": np.array(float(self.heads), np.float32),
            }
            self.constant(name, values[name])
        return name

    def constant(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float32).cpu().numpy()
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str | None = None, **attributes: Any) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], domain=domain, **attributes))
        return output

    def build(self) -> Any:
        from onnx import TensorProto

        helper, key = self.helper, self.key
        hidden, counts = self.embed() if key.embed else "hidden", []
        for position, index in enumerate(range(key.start, key.stop)):
            hidden = self.layer(index, hidden, position if key.prunes[position] else None)
            counts.append(self.node("Shape", [hidden], f"l{index}.count", start=0, end=1))
        self.node("Concat", counts, "counts", axis=0)
        self.node("Identity", [hidden], "out")
        if key.embed:
            names = ("input_ids", "token_type_ids")
            inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["tokens"]) for name in names]
        else:
            inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["tokens", self.d])]
        if any(key.prunes):
            inputs.append(helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, [len(key.prunes)]))
        outputs = [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["kept", self.d]),
            helper.make_tensor_value_info("counts", TensorProto.INT64, [len(key.prunes)]),
        ]
        labels = self.layers.num_labels
        if key.exit_head:
            self.exit_head(key.stop - 1, hidden)
            outputs.append(helper.make_tensor_value_info("exit_logits", TensorProto.FLOAT, [1, labels]))
            outputs.append(helper.make_tensor_value_info("uncertainty", TensorProto.FLOAT, [1]))
        if key.classify:
            self.classify(hidden)
            outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, labels]))
        graph = helper.make_graph(self.nodes, f"layers_{key.start}_{key.stop}", inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets)

    def read_in_place(self, name: str, table: torch.Tensor) -> str:
        """``table`` ``(rows, d)`` float32 as the initializer ``name``, read in place by the session."""
        self.in_place[name] = table
        return self.constant(name, table[:1])

    def embed(self) -> str:
        """``LayerNorm(word[input_ids] + type[token_type_ids] + position[:n])`` ``(n, d)``, HF's ``BertEmbeddings``
        in its order of additions."""
        embeddings = self.layers.parts.embeddings
        word = self.read_in_place("embed.word", embeddings.word_embeddings.weight)
        types = self.read_in_place("embed.type", embeddings.token_type_embeddings.weight)
        positions = self.read_in_place("embed.position", embeddings.position_embeddings.weight)
        n = self.node("Shape", ["input_ids"], "embed.n")
        position = self.node("Slice", [positions, self.shared("axis0"), n], "embed.positions")
        summed = self.node(
            "Add",
            [
                self.node("Gather", [word, "input_ids"], "embed.words", axis=0),
                self.node("Gather", [types, "token_type_ids"], "embed.types", axis=0),
            ],
            "embed.sum0",
        )
        summed = self.node("Add", [summed, position], "embed.sum")
        norm = embeddings.LayerNorm
        weights = [self.constant("embed.g", norm.weight), self.constant("embed.b", norm.bias)]
        return self.node("LayerNormalization", [summed, *weights], "embedded", axis=-1, epsilon=float(norm.eps))

    def layer(self, index: int, x: str, threshold_position: int | None) -> str:
        """Layer ``index`` on ``x`` ``(n, d)``; prunes with ``thresholds[threshold_position]`` unless None."""
        source = self.layers.layers[index]
        weights = source.projections
        p = f"l{index}."
        qkv_weight = weights.qkv.weight.T
        if threshold_position is None:
            context = self.fused_attention(p, x, qkv_weight, weights.qkv.bias)
        else:
            context, importance = self.explicit_attention(p, x, qkv_weight, weights.qkv.bias)
        dense = weights.attention_output
        projected = self.node("MatMul", [context, self.constant(p + "wo", dense.weight.T)], p + "projected")
        attended = self.skip_layer_norm(p + "attended", projected, x, dense.bias, source.attention_norm)
        if threshold_position is not None:
            attended = self.keep_important(p, attended, importance, threshold_position)
        intermediate = weights.intermediate
        up = self.node("MatMul", [attended, self.constant(p + "wi", intermediate.weight.T)], p + "up")
        activation = BIAS_ACTIVATIONS[self.layers.hidden_act]
        active = self.node(activation, [up, self.constant(p + "bi", intermediate.bias)], p + "active", MS_DOMAIN)
        output = weights.output
        down = self.node("MatMul", [active, self.constant(p + "wf", output.weight.T)], p + "down")
        return self.skip_layer_norm(p + "out", down, attended, output.bias, source.output_norm)

    def skip_layer_norm(self, name: str, x: str, skip: str, bias: torch.Tensor, norm: torch.nn.LayerNorm) -> str:
        """``LayerNorm(x + skip + bias)``."""
        inputs = [x, skip, self.constant(name + ".g", norm.weight), self.constant(name + ".b", norm.bias)]
        inputs.append(self.constant(name + ".bias", bias))
        return self.node("SkipLayerNormalization", inputs, name, MS_DOMAIN, epsilon=float(norm.eps))

    def fused_attention(self, p: str, x: str, weight: torch.Tensor, bias: torch.Tensor) -> str:
        """Context ``(n, d)`` by ORT's ``Attention`` (the Q/K/V projection inside), no importance."""
        batched = self.node("Unsqueeze", [x, self.shared("axis0")], p + "batched")
        inputs = [batched, self.constant(p + "wqkv", weight), self.constant(p + "bqkv", bias)]
        context = self.node("Attention", inputs, p + "context3", MS_DOMAIN, num_heads=self.heads)
        return self.node("Squeeze", [context, self.shared("axis0")], p + "context")

    def explicit_attention(self, p: str, x: str, weight: torch.Tensor, bias: torch.Tensor) -> tuple[str, str]:
        """Context ``(n, d)`` and importance ``(n,)`` from explicit probabilities (``uniform_attention``'s
        arithmetic: ``q`` scaled first, importance = column sums / (heads * n))."""
        heads, head_dim = self.heads, self.head_dim
        projected = self.node("MatMul", [x, self.constant(p + "wqkv", weight)], p + "qkv0")
        qkv = self.node("Add", [projected, self.constant(p + "bqkv", bias)], p + "qkv")
        shape = self.constant(p + "shape3", np.array([-1, 3 * heads, head_dim], dtype=np.int64))
        split = self.node("Reshape", [qkv, shape], p + "qkv3")
        by_head = self.node("Transpose", [split], p + "by_head", perm=[1, 0, 2])
        self.nodes.append(self.helper.make_node("Split", [by_head], [p + "q", p + "k", p + "v"], axis=0))
        scale = self.constant(p + "scale", np.array((self.d // heads) ** -0.5, dtype=np.float32))
        q = self.node("Mul", [p + "q", scale], p + "q_scaled")
        scores = self.node("FusedMatMul", [q, p + "k"], p + "scores", MS_DOMAIN, transB=1)
        probs = self.node("Softmax", [scores], p + "probs", axis=-1)
        context = self.node("MatMul", [probs, p + "v"], p + "context_by_head")
        context = self.node("Transpose", [context], p + "context_t", perm=[1, 0, 2])
        context = self.node("Reshape", [context, self.constant(p + "shape2", np.array([-1, self.d]))], p + "context")
        sums = self.node("ReduceSum", [probs, self.constant(p + "axes01", np.array([0, 1]))], p + "sums", keepdims=0)
        return context, sums

    def keep_important(self, p: str, attended: str, sums: str, position: int) -> str:
        """Rows of ``attended`` whose importance exceeds ``thresholds[position] / n``; row 0 always kept."""
        n = self.node("Cast", [self.node("Shape", [sums], p + "n_int")], p + "n", to=1)  # (1,) float32
        importance = self.node(
            "Div", [sums, self.node("Mul", [self.shared("heads"), n], p + "heads_n")], p + "importance"
        )
        index = self.constant(p + "position", np.array([position], dtype=np.int64))
        threshold = self.node("Gather", ["thresholds", index], p + "threshold", axis=0)
        per_token = self.node("Div", [threshold, n], p + "per_token")
        one, end = self.constant(p + "one", np.array([1])), self.constant(p + "end", np.array([np.iinfo(np.int64).max]))
        rest = self.node("Slice", [importance, one, end], p + "rest")
        above = self.node("Greater", [rest, per_token], p + "above")
        keep = self.node("Concat", [self.constant(p + "first", np.array([True])), above], p + "keep", axis=0)
        rows = self.node("Reshape", [self.node("NonZero", [keep], p + "nonzero"), self.shared("minus_one")], p + "rows")
        return self.node("Gather", [attended, rows], p + "kept", axis=0)

    def classify(self, hidden: str) -> None:
        """``logits`` ``(1, labels)``: the main classifier on ``hidden``'s first row."""
        parts = self.layers.parts
        first = self.node("Gather", [hidden, self.shared("axis0")], "first", axis=0)
        pooler = [self.constant("pooler.w", parts.pooler.weight), self.constant("pooler.b", parts.pooler.bias)]
        pooled = self.node("Tanh", [self.node("Gemm", [first, *pooler], "pooler", transB=1)], "pooled")
        output = [self.constant("classifier.w", parts.classifier.weight)]
        output.append(self.constant("classifier.b", parts.classifier.bias))
        self.node("Gemm", [pooled, *output], "logits", transB=1)

    def exit_head(self, index: int, hidden: str) -> None:
        """``exit_logits`` ``(1, labels)``: sub-classifier ``index`` on the mean of ``hidden``'s rows."""
        head = self.layers.layers[index].exit_head
        p = f"exit{index}."
        pooled = self.node("ReduceMean", [hidden], p + "pooled", axes=[0], keepdims=1)
        first = [self.constant(p + "w1", head.dense.weight), self.constant(p + "b1", head.dense.bias)]
        active = self.node("Tanh", [self.node("Gemm", [pooled, *first], p + "dense", transB=1)], p + "tanh")
        second = [self.constant(p + "w2", head.classifier.weight), self.constant(p + "b2", head.classifier.bias)]
        logits = self.node("Gemm", [active, *second], "exit_logits", transB=1)
        self.uncertainty(logits)

    def uncertainty(self, logits: str) -> None:
        """``uncertainty`` ``(1,)``: the normalised entropy of ``softmax(logits)`` clamped to [0, 1], computed as
        ``mp_kernels.entropy_exit``'s PyTorch reference does in float32 (``xlogy``: 0 where p is 0; NaN logits
        give NaN, which never passes the exit test)."""
        p = self.node("Softmax", [logits], "exit.p", axis=1)
        terms = self.node("Mul", [p, self.node("Log", [p], "exit.log_p")], "exit.p_log_p")
        zero = self.constant("exit.zero", np.array(0.0, np.float32))
        terms = self.node("Where", [self.node("Equal", [p, zero], "exit.p_zero"), zero, terms], "exit.xlogy")
        entropy = self.node(
            "ReduceSum", [terms, self.constant("exit.axis1", np.array([1]))], "exit.entropy", keepdims=0
        )
        labels = self.layers.num_labels
        scale = self.constant("exit.scale", np.array(-1.0 / math.log(labels), np.float32))
        scaled = self.node("Mul", [entropy, scale], "exit.scaled")
        one = self.constant("exit.one", np.array(1.0, np.float32))
        self.node("Clip", [scaled, zero, one], "uncertainty")
