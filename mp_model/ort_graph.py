"""ONNX graphs of a lone sequence's encoder layers, built from a model's own weights (``onnx.helper``, no export).

``GraphBuilder(source, key).build()`` returns the ``onnx.ModelProto`` of layers ``key.start`` to ``key.stop - 1``
for one sequence of ``n`` tokens. Per layer, on ``x`` ``(n, d)``:

* attention: the fused Q/K/V projection, then, where the layer prunes, the probabilities explicitly (softmax of
  ``(q * scale) k^T``), the context, and each token's importance (the column mean of the probabilities over
  heads and rows, ``importance > threshold / n`` in float32 as ``prune_tokens``' caller computes it, the first
  token always kept); where it does not, ORT's fused ``Attention`` operator;
* the output projection plus residual and LayerNorm (``SkipLayerNormalization``);
* real removal: the rows of the kept tokens (``NonZero``, ``Gather``), so the feed-forward runs on them only;
* the feed-forward (``BiasGelu``/``FastGelu``, ``SkipLayerNormalization``).

A graph starting at the first layer may start from the token ids: the embeddings (word + token type + position,
LayerNorm), whose tables the session reads in place (``GraphBuilder.in_place``; the graph holds a one-row
placeholder of each). After the model's last layer the main classifier runs (pooler and output layer on the first
token). Two kinds of graph (``RunKey.exits``):

* **a run of layers**: inputs ``input_ids`` and ``token_type_ids`` ``(n,)`` int64 (``key.embed``) or ``hidden``
  ``(n, d)`` float32, and ``knobs`` (below) where a layer prunes; outputs ``out``
  ``(m, d)`` (the remaining tokens' hidden states), ``counts`` ``(stop - start,)`` int64 (tokens kept after each
  layer), with ``key.exit_head`` the last layer's sub-classifier ``exit_logits`` ``(1, labels)`` (on the mean of
  the remaining tokens) and their ``uncertainty`` ``(1,)``, and with ``key.classify`` the main classifier's
  ``logits`` ``(1, labels)``;
* **a run to the exit** (layers ``start`` to the last): after each layer but the last, its sub-classifier and the
  exit test as an ``If`` node: leave when ``uncertainty <= tau`` (float32, as ``entropy_exit`` compares; NaN never
  leaves) or when the layer is ``exit_after`` (a replayed schedule), else run the next layers, nested in the
  ``else`` branch, so one session call runs a sequence to its exit with no host round trip per layer. Its
  ``knobs`` input is always there (with two layers or more); outputs ``logits``
  ``(1, labels)`` (the exit's sub-classifier or the main classifier), ``exit_layer`` ``(1,)`` int64 (layers run in
  all), ``counts`` ``(layers - start,)`` int64 (0 after the exit) and ``exit_logits`` ``(layers - 1 - start,
  labels)`` (each sub-classifier run, NaN after the exit).

``knobs`` ``(2 + stop - start,)`` float32 holds ``tau``, ``exit_after`` (a layer number; -1 never passes either
test) and each layer's pruning threshold (one input: each input array costs the caller tens of microseconds with
cold caches, ``bench/NOTES.md``). The uncertainty is ``mp_kernels.entropy_exit``'s: the normalised entropy of
``softmax(logits)`` clamped to [0, 1], in float32 (``xlogy``: 0 where p is 0; NaN logits give NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mp_model.fused_weights import LayerProjections

# ``config.hidden_act`` -> the ORT operator that applies it to ``x + bias``.
BIAS_ACTIVATIONS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu"}
OPSET = 17
MS_DOMAIN = "com.microsoft"
FLOAT, INT64 = 1, 7  # onnx.TensorProto's element types


@dataclass(frozen=True)
class RunKey:
    """Which graph: layers ``[start, stop)``, which of them prune, whether it starts from token ids (the embeddings
    run first), whether the last layer's sub-classifier runs (``exit_head``), whether the main classifier follows
    (``classify``: ``stop`` is the last layer), whether it is a run to the exit (``exits``: sub-classifiers and the
    exit test after every layer, ``stop`` the last), and its session's intra-op thread count."""

    start: int
    stop: int
    prunes: tuple[bool, ...]
    embed: bool
    exit_head: bool
    classify: bool
    exits: bool
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
class ModelSource:
    """A model as the graphs see it: its layers, the embeddings module, the pooler's dense layer (tanh follows),
    the main classifier's output layer, the head count, the activation name and the label count."""

    layers: list[LayerSource]
    embeddings: nn.Module
    pooler: nn.Linear
    classifier: nn.Linear
    heads: int
    hidden_act: str
    num_labels: int


def takes_knobs(key: RunKey) -> bool:
    """Whether the graph of ``key`` has the ``knobs`` input: a layer prunes, or it is a run to the exit through two
    layers or more."""
    return any(key.prunes) or (key.exits and key.stop - key.start > 1)


class GraphBuilder:
    """Nodes and initializers of one graph (``RunKey``), named ``l<i>.<name>`` per layer; ``in_place`` maps the
    initializers the session must read in place to their tensors."""

    def __init__(self, source: ModelSource, key: RunKey) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.source, self.key = source, key
        # Nodes and initializers of the main graph, then of each open ``If`` branch. A weight is an initializer of
        # the branch that uses it: ORT packs the GEMM weights at load only for a graph's own initializers (an
        # outer-scope one is packed again on every call: 0.6 ms a layer on MiniLM, bench/NOTES.md).
        self.scopes: list[list[Any]] = [[]]
        self.initializers: list[list[Any]] = [[]]
        self.shared_names: set[str] = set()
        self.in_place: dict[str, torch.Tensor] = {}
        self.d = source.layers[0].projections.attention_output.weight.shape[0]
        self.heads = source.heads
        self.head_dim = self.d // self.heads
        self.layer_count = len(source.layers)

    def shared(self, name: str) -> str:
        """The graph-wide constant ``name`` (``zero``, ``one``, ``two``, ``minus_one``: ``(1,)`` int64; ``heads``:
        a float32 scalar), added on first use."""
        if name not in self.shared_names:
            self.shared_names.add(name)
            values = {
                "zero": np.array([0], np.int64),
                "one": np.array([1], np.int64),
                "two": np.array([2], np.int64),
                "minus_one": np.array([-1], np.int64),
                "heads": np.array(float(self.heads), np.float32),
            }
            self.constant(name, values[name], scope=0)
        return name

    def constant(self, name: str, value: np.ndarray | torch.Tensor, scope: int = -1) -> str:
        """An initializer of the current scope (default) or of ``scope``; tensors are stored in float32."""
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float32).cpu().numpy()
        self.initializers[scope].append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str | None = None, **attributes: Any) -> str:
        self.scopes[-1].append(self.helper.make_node(op, inputs, [output], domain=domain, **attributes))
        return output

    def build(self) -> Any:
        """The ``onnx.ModelProto`` (see the module docstring)."""
        helper, key = self.helper, self.key
        hidden = self.embed() if key.embed else "hidden"
        labels, runs = self.source.num_labels, key.stop - key.start
        if key.exits:
            names = ("logits", "exit_layer", "counts", "exit_logits")
            values = dict(zip(names, self.layers_from(key.start, hidden), strict=True))
            declared = {
                "logits": (FLOAT, [1, labels]),
                "exit_layer": (INT64, [1]),
                "counts": (INT64, [runs]),
                "exit_logits": (FLOAT, [runs - 1, labels]),
            }
        else:
            values, declared = self.run_of_layers(hidden), {"out": (FLOAT, ["kept", self.d]), "counts": (INT64, [runs])}
            declared |= {
                "exit_logits": (FLOAT, [1, labels]),
                "uncertainty": (FLOAT, [1]),
                "logits": (FLOAT, [1, labels]),
            }
        for name, value in values.items():
            self.node("Identity", [value], name)
        if key.embed:
            inputs = [
                helper.make_tensor_value_info(name, INT64, ["tokens"]) for name in ("input_ids", "token_type_ids")
            ]
        else:
            inputs = [helper.make_tensor_value_info("hidden", FLOAT, ["tokens", self.d])]
        if takes_knobs(key):
            inputs.append(helper.make_tensor_value_info("knobs", FLOAT, [2 + runs]))
        outputs = [helper.make_tensor_value_info(name, *declared[name]) for name in values]
        graph = helper.make_graph(
            self.scopes[0], f"layers_{key.start}_{key.stop}", inputs, outputs, self.initializers[0]
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets)

    def run_of_layers(self, hidden: str) -> dict[str, str]:
        """Layers ``[start, stop)`` on ``hidden``, then the last one's sub-classifier and the main classifier as
        the key asks: the outputs of a run of layers (module docstring) by name."""
        key = self.key
        counts = []
        for position, index in enumerate(range(key.start, key.stop)):
            hidden = self.layer(index, hidden, position if key.prunes[position] else None)
            counts.append(self.node("Shape", [hidden], f"l{index}.count", start=0, end=1))
        values = {"out": hidden, "counts": self.node("Concat", counts, "all_counts", axis=0)}
        if key.exit_head:
            values["exit_logits"] = self.exit_head(key.stop - 1, hidden)
            values["uncertainty"] = self.uncertainty(key.stop - 1, values["exit_logits"])
        if key.classify:
            values["logits"] = self.classify(hidden)
        return values

    def layers_from(self, index: int, x: str) -> tuple[str, str, str, str]:
        """Layers ``index`` to the last on ``x``, into the current scope: names of ``(logits, exit_layer, counts,
        exit_logits)`` as the module docstring gives them for a run to the exit starting at ``index``."""
        position = index - self.key.start
        hidden = self.layer(index, x, position if self.key.prunes[position] else None)
        count = self.node("Shape", [hidden], f"l{index}.count", start=0, end=1)
        if index == self.layer_count - 1:
            exit_layer = self.constant(f"l{index}.exit_layer", np.array([self.layer_count], np.int64))
            empty = self.constant(f"l{index}.no_exit_logits", np.zeros((0, self.source.num_labels), np.float32))
            return self.classify(hidden), exit_layer, count, empty
        head_logits = self.exit_head(index, hidden)
        leave = self.exit_test(index, head_logits)
        p, later = f"l{index}.", self.layer_count - 1 - index
        self.open_scope()
        stay = [
            self.constant(p + "left_at", np.array([index + 1], np.int64)),
            self.constant(p + "no_counts", np.zeros(later, np.int64)),
            self.constant(p + "no_exit_logits", np.full((later - 1, self.source.num_labels), np.nan, np.float32)),
        ]
        left = self.branch(p + "leave", [head_logits, *stay])
        self.open_scope()
        rest = self.branch(p + "go_on", list(self.layers_from(index + 1, hidden)))
        names = [p + name for name in ("logits", "exit_layer", "later_counts", "later_exit_logits")]
        self.scopes[-1].append(self.helper.make_node("If", [leave], names, then_branch=left, else_branch=rest))
        counts = self.node("Concat", [count, names[2]], p + "counts", axis=0)
        exit_logits = self.node("Concat", [head_logits, names[3]], p + "exit_logits", axis=0)
        return names[0], names[1], counts, exit_logits

    def open_scope(self) -> None:
        """Start an ``If`` branch: nodes and initializers go to it until ``branch`` closes it."""
        self.scopes.append([])
        self.initializers.append([])

    def branch(self, name: str, values: list[str]) -> Any:
        """Close the innermost scope as an ``If`` branch graph returning ``values`` (through ``Identity`` nodes:
        a branch output must be computed in the branch)."""
        outputs = [self.node("Identity", [value], f"{name}.{i}") for i, value in enumerate(values)]
        nodes, initializers = self.scopes.pop(), self.initializers.pop()
        types = (FLOAT, INT64, INT64, FLOAT)  # logits, exit_layer, counts, exit_logits
        declared = [
            self.helper.make_tensor_value_info(out, kind, None) for out, kind in zip(outputs, types, strict=True)
        ]
        return self.helper.make_graph(nodes, name, [], declared, initializers)

    def read_in_place(self, name: str, table: torch.Tensor) -> str:
        """``table`` ``(rows, d)`` float32 as the initializer ``name``, read in place by the session."""
        self.in_place[name] = table
        return self.constant(name, table[:1], scope=0)

    def embed(self) -> str:
        """``LayerNorm(word[input_ids] + type[token_type_ids] + position[:n])`` ``(n, d)``, HF's ``BertEmbeddings``
        in its order of additions."""
        embeddings = self.source.embeddings
        word = self.read_in_place("embed.word", embeddings.word_embeddings.weight)
        types = self.read_in_place("embed.type", embeddings.token_type_embeddings.weight)
        positions = self.read_in_place("embed.position", embeddings.position_embeddings.weight)
        n = self.node("Shape", ["input_ids"], "embed.n")
        position = self.node("Slice", [positions, self.shared("zero"), n], "embed.positions")
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
        source = self.source.layers[index]
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
        activation = BIAS_ACTIVATIONS[self.source.hidden_act]
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
        batched = self.node("Unsqueeze", [x, self.shared("zero")], p + "batched")
        inputs = [batched, self.constant(p + "wqkv", weight), self.constant(p + "bqkv", bias)]
        context = self.node("Attention", inputs, p + "context3", MS_DOMAIN, num_heads=self.heads)
        return self.node("Squeeze", [context, self.shared("zero")], p + "context")

    def explicit_attention(self, p: str, x: str, weight: torch.Tensor, bias: torch.Tensor) -> tuple[str, str]:
        """Context ``(n, d)`` and importance ``(n,)`` from explicit probabilities (``uniform_attention``'s
        arithmetic: ``q`` scaled first, importance = column sums / (heads * n))."""
        heads, head_dim = self.heads, self.head_dim
        projected = self.node("MatMul", [x, self.constant(p + "wqkv", weight)], p + "qkv0")
        qkv = self.node("Add", [projected, self.constant(p + "bqkv", bias)], p + "qkv")
        shape = self.constant(p + "shape3", np.array([-1, 3 * heads, head_dim], dtype=np.int64))
        split = self.node("Reshape", [qkv, shape], p + "qkv3")
        by_head = self.node("Transpose", [split], p + "by_head", perm=[1, 0, 2])
        self.scopes[-1].append(self.helper.make_node("Split", [by_head], [p + "q", p + "k", p + "v"], axis=0))
        scale = self.constant(p + "scale", np.array((self.d // heads) ** -0.5, dtype=np.float32))
        q = self.node("Mul", [p + "q", scale], p + "q_scaled")
        scores = self.node("FusedMatMul", [q, p + "k"], p + "scores", MS_DOMAIN, transB=1)
        probs = self.node("Softmax", [scores], p + "probs", axis=-1)
        context = self.node("MatMul", [probs, p + "v"], p + "context_by_head")
        context = self.node("Transpose", [context], p + "context_t", perm=[1, 0, 2])
        shape = self.constant(p + "shape2", np.array([-1, self.d], np.int64))
        context = self.node("Reshape", [context, shape], p + "context")
        axes = self.constant(p + "axes01", np.array([0, 1], np.int64))
        sums = self.node("ReduceSum", [probs, axes], p + "sums", keepdims=0)
        return context, sums

    def keep_important(self, p: str, attended: str, sums: str, position: int) -> str:
        """Rows of ``attended`` whose importance exceeds ``thresholds[position] / n``; row 0 always kept."""
        n = self.node("Cast", [self.node("Shape", [sums], p + "n_int")], p + "n", to=FLOAT)  # (1,) float32
        importance = self.node(
            "Div", [sums, self.node("Mul", [self.shared("heads"), n], p + "heads_n")], p + "importance"
        )
        index = self.constant(p + "position", np.array([2 + position], dtype=np.int64))
        threshold = self.node("Gather", ["knobs", index], p + "threshold", axis=0)
        per_token = self.node("Div", [threshold, n], p + "per_token")
        end = self.constant(p + "end", np.array([np.iinfo(np.int64).max], np.int64))
        rest = self.node("Slice", [importance, self.shared("one"), end], p + "rest")
        above = self.node("Greater", [rest, per_token], p + "above")
        keep = self.node("Concat", [self.constant(p + "first", np.array([True])), above], p + "keep", axis=0)
        rows = self.node("Reshape", [self.node("NonZero", [keep], p + "nonzero"), self.shared("minus_one")], p + "rows")
        return self.node("Gather", [attended, rows], p + "kept", axis=0)

    def classify(self, hidden: str) -> str:
        """The main classifier's logits ``(1, labels)`` on ``hidden``'s first row."""
        first = self.node("Gather", [hidden, self.shared("zero")], "first", axis=0)
        pooler = [
            self.constant("pooler.w", self.source.pooler.weight),
            self.constant("pooler.b", self.source.pooler.bias),
        ]
        pooled = self.node("Tanh", [self.node("Gemm", [first, *pooler], "pooler", transB=1)], "pooled")
        output = [self.constant("classifier.w", self.source.classifier.weight)]
        output.append(self.constant("classifier.b", self.source.classifier.bias))
        return self.node("Gemm", [pooled, *output], "main_logits", transB=1)

    def exit_head(self, index: int, hidden: str) -> str:
        """Sub-classifier ``index``'s logits ``(1, labels)`` on the mean of ``hidden``'s rows."""
        head = self.source.layers[index].exit_head
        p = f"exit{index}."
        pooled = self.node("ReduceMean", [hidden], p + "pooled", axes=[0], keepdims=1)
        first = [self.constant(p + "w1", head.dense.weight), self.constant(p + "b1", head.dense.bias)]
        active = self.node("Tanh", [self.node("Gemm", [pooled, *first], p + "dense", transB=1)], p + "tanh")
        second = [self.constant(p + "w2", head.classifier.weight), self.constant(p + "b2", head.classifier.bias)]
        return self.node("Gemm", [active, *second], p + "logits", transB=1)

    def uncertainty(self, index: int, logits: str) -> str:
        """Sub-classifier ``index``'s uncertainty ``(1,)`` from its ``logits`` (module docstring)."""
        e = f"exit{index}."
        p = self.node("Softmax", [logits], e + "p", axis=1)
        terms = self.node("Mul", [p, self.node("Log", [p], e + "log_p")], e + "p_log_p")
        zero = self.constant(e + "zero", np.array(0.0, np.float32))
        terms = self.node("Where", [self.node("Equal", [p, zero], e + "p_zero"), zero, terms], e + "xlogy")
        entropy = self.node("ReduceSum", [terms, self.shared("one")], e + "entropy", keepdims=0)
        scale = self.constant(e + "scale", np.array(-1.0 / math.log(self.source.num_labels), np.float32))
        one = self.constant(e + "one", np.array(1.0, np.float32))
        return self.node("Clip", [self.node("Mul", [entropy, scale], e + "scaled"), zero, one], e + "uncertainty")

    def exit_test(self, index: int, logits: str) -> str:
        """Whether the sequence leaves after layer ``index`` (bool scalar): the uncertainty of ``logits`` is at most
        ``tau`` (NaN never is), or ``exit_after`` names this layer."""
        e = f"exit{index}."
        tau = self.node("Slice", ["knobs", self.shared("zero"), self.shared("one")], e + "tau")
        confident = self.node("LessOrEqual", [self.uncertainty(index, logits), tau], e + "confident")
        exit_after = self.node("Slice", ["knobs", self.shared("one"), self.shared("two")], e + "exit_after")
        layer = self.constant(e + "layer", np.array([index + 1], np.float32))
        scheduled = self.node("Equal", [exit_after, layer], e + "scheduled")
        leave = self.node("Or", [confident, scheduled], e + "leave_1")
        return self.node("Squeeze", [leave, self.shared("zero")], e + "leave")
