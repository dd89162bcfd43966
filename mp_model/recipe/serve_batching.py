"""``mp serve``'s model side: the ``Classifier`` that encodes texts and runs one batch, and the ``Batcher``, a queue
whose worker thread forms token-budget batches and runs them off the event loop.

Each text of a request becomes a ``Job`` with its encoding, its knobs (``tau``, ``threshold_scale``) and a
``concurrent.futures.Future`` that the event loop awaits. The worker takes the oldest waiting job and, among the
jobs with the same knobs in arrival order, as many as fit ``max_batch_requests`` texts and ``max_batch_tokens``
padded tokens (texts x longest, as ``mp predict``'s ``token_budget_batches``; a text longer than the budget runs
alone); it waits up to ``max_wait`` after the oldest job's arrival for the batch to fill. The batch runs sorted
longest first through ``mp_model.recipe.evaluation.run_batch``, the packed path of ``mp predict``: a text's label
and exit layer do not depend on the batch it ran in (its scores agree to float32 rounding). An exception in a pass
fails that batch's jobs only; a non-finite logit fails its own text. Once the queue drains, the worker hands the
heap's free pages back to the system (at most once a second), so that the memory a burst took does not stay.
``close`` lets the worker finish every job already queued, then stops it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.data import TextExample, batches, encode
from mp_model.recipe.evaluation import run_batch
from mp_model.recipe.predict import token_budget_batches
from mp_model.recipe.serve_metrics import ServeMetrics
from mp_model.recipe.stream import release_free_memory

TRIM_INTERVAL = 1.0  # seconds: at most one heap trim a second, and only once the queue has drained


LONE_BELOW = 16
"""On the CPU, a batch of fewer texts runs one text a forward. In process the packed path gains little at a few
texts (quick-start model, one thread: 5.4 ms a short text alone, 6.7 in pairs, 5.1 in fours, 4.5 in eights, 4.1 in
32s), and inside the server it lost at 8 clients (0.74x of one text a forward with 4 here, 1.03x with 16; at 32
clients 1.12x and 1.13x; ``bench/NOTES.md``, "mp serve"): its many small calls compete with the event loop, while
the lone-sequence path is one ONNX Runtime call."""


class InferenceError(RuntimeError):
    """The model failed on a text (an exception in its batch's pass, or a non-finite logit): HTTP 424."""


class InputTooLong(ValueError):
    """A text has more tokens than the model takes and truncation was not asked for: HTTP 413."""


@dataclass(frozen=True)
class Knobs:
    """The speed knobs of a request; jobs share batches only with jobs of equal knobs."""

    tau: float
    threshold_scale: float


@dataclass(frozen=True)
class Scores:
    """One text's outcome: its main-classifier ``logits`` (float32 values), the layers it ran (``exit_layer``), its
    tokens times those layers (``tokens``) and the tokens it kept over them (``kept``)."""

    logits: list[float]
    exit_layer: int
    tokens: int
    kept: int


@dataclass
class Job:
    """One text waiting for the model: its token ids and segment ids, its knobs, the future its answer goes to."""

    input_ids: list[int]
    token_type_ids: list[int]
    knobs: Knobs
    future: Future = field(default_factory=Future)
    arrival: float = field(default_factory=time.perf_counter)


def encode_texts(
    tokenizer: Any, max_length: int, texts: Sequence[tuple[str, str | None]], truncate: bool
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, token_type_ids)`` of each ``(text, text_pair)``, truncated to ``max_length`` tokens if
    ``truncate``; otherwise a text longer than that is an ``InputTooLong`` naming its position."""
    examples = [TextExample(text, 0, pair) for text, pair in texts]
    limit = max_length if truncate else max_length + 1
    encoded = encode(tokenizer, examples, limit)
    for position, ids in enumerate(encoded["input_ids"]):
        if len(ids) > max_length:
            raise InputTooLong(
                f"inputs[{position}] has more than {max_length} tokens, the model's limit: shorten it or send "
                "truncate: true"
            )
    return list(zip(encoded["input_ids"], encoded["token_type_ids"], strict=True))


class Classifier:
    """A loaded model and its tokenizer as the server uses them: ``encode`` texts, ``forward`` one batch.

    ``dense=True`` serves the model's HF twin (``mp_model.hf_twin``: ``BertForSequenceClassification`` with the same
    backbone and classifier, no pruning, no exit), the dense baseline of ``bench/bench_serve.py``.
    """

    def __init__(
        self,
        model: MagicPyramidForSequenceClassification,
        tokenizer: Any,
        *,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
        dense: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, torch.device(device)
        self.max_length = max_length or model.config.max_position_embeddings
        self.layers = model.config.num_hidden_layers
        self.labels = [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]
        self.dense = None
        if dense:
            from mp_model.hf_twin import hf_twin

            self.dense = hf_twin(model)
        self.alive = True  # in process the model lives as long as the server (``serve_worker`` may lose its child)
        self.worker = "thread"  # the model runs in the batcher's thread (``serve_worker.ModelProcess``: "process")

    @property
    def dtype(self) -> str:
        """The model's parameter dtype, as ``"float32"``."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def dense_hf(self) -> bool:
        """Whether this serves the dense HF twin."""
        return self.dense is not None

    def facts(self) -> dict[str, Any]:
        """What the server's process needs to know of the model when it runs elsewhere (``serve_worker``)."""
        return {"labels": self.labels, "layers": self.layers, "max_length": self.max_length,
                "device": str(self.device), "dtype": self.dtype, "dense_hf": self.dense_hf}  # fmt: skip

    def encode(self, texts: Sequence[tuple[str, str | None]], truncate: bool) -> list[tuple[list[int], list[int]]]:
        """``encode_texts`` with this model's tokenizer and length."""
        return encode_texts(self.tokenizer, self.max_length, texts, truncate)

    def close(self) -> None:
        """Nothing to release: the model goes with the server's process (``ModelProcess.close`` ends its child)."""

    def warm_up(self, knobs: Knobs) -> None:
        """One pass of a lone text and one of a pair of texts, so that the first requests do not pay for building
        the lone-sequence engine's sessions and the first packed batch."""
        encoded = self.encode([("warm up", None), ("warm up the model", None)], truncate=True)
        jobs = [Job(ids, types, knobs) for ids, types in encoded]
        self.forward(jobs[:1], knobs)
        self.forward(jobs, knobs)

    @torch.inference_mode()
    def forward(self, jobs: Sequence[Job], knobs: Knobs) -> list[Scores | InferenceError]:
        """One padded batch of ``jobs`` (all with ``knobs``) through the model; one outcome per job, in order. On the
        CPU, fewer than ``LONE_BELOW`` texts run one a forward."""
        count = len(jobs)
        if 1 < count < LONE_BELOW and self.device.type == "cpu" and self.dense is None:
            return [outcome for job in jobs for outcome in self.forward([job], knobs)]
        encoded = {
            "input_ids": [job.input_ids for job in jobs],
            "attention_mask": [[1] * len(job.input_ids) for job in jobs],
            "token_type_ids": [job.token_type_ids for job in jobs],
            "labels": [0] * count,
        }
        batch = next(batches(encoded, count, pad_token_id=self.tokenizer.pad_token_id or 0))
        lengths = batch["attention_mask"].sum(dim=1)
        if self.dense is not None:
            inputs = [batch[key].to(self.device) for key in ("input_ids", "attention_mask", "token_type_ids")]
            logits = self.dense(*inputs).logits.float().cpu()
            exits = torch.full((count,), self.layers)
            kept = lengths * self.layers
        else:
            tuned = {"tau": knobs.tau, "threshold_scale": knobs.threshold_scale}
            out = run_batch(self.model, batch, self.device, prune=True, early_exit=True, **tuned)
            logits, exits, kept = out.logits.float().cpu(), out.exit_layer.cpu(), out.kept_tokens.cpu().sum(dim=1)
        outcomes: list[Scores | InferenceError] = []
        for row in range(count):
            values = logits[row].tolist()
            if not all(math.isfinite(value) for value in values):
                outcomes.append(InferenceError("the model gave a non-finite logit for this text"))
                continue
            layers = int(exits[row])
            outcomes.append(Scores(values, layers, int(lengths[row]) * layers, int(kept[row])))
        return outcomes


Runner = Callable[[Sequence[Job], Knobs], list[Scores | InferenceError]]


class Batcher:
    """The queue of jobs and the worker thread that runs them in token-budget batches (see the module docstring)."""

    def __init__(
        self,
        run: Runner,
        metrics: ServeMetrics,
        *,
        max_batch_tokens: int,
        max_batch_requests: int,
        max_wait: float,
    ) -> None:
        self.run, self.metrics = run, metrics
        self.max_batch_tokens, self.max_batch_requests, self.max_wait = max_batch_tokens, max_batch_requests, max_wait
        self._jobs: list[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="mp-serve-model", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs and the queue takes jobs."""
        return self._thread.is_alive() and not self._closing

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (their futures get ``Scores`` or an ``InferenceError``); a ``RuntimeError`` once closed."""
        with self._condition:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._jobs.extend(jobs)
            self.metrics.add_queued(len(jobs))
            self._condition.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs, let the worker finish those queued, and wait up to ``timeout`` seconds for it."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._thread.join(timeout)

    def _select(self) -> tuple[list[Job], bool]:
        """The next batch (the oldest job and the same-knob jobs after it that fit) and whether it is full."""
        oldest = self._jobs[0]
        chosen, longest, left_out = [oldest], len(oldest.input_ids), False
        for job in self._jobs[1:]:
            if job.knobs != oldest.knobs:
                continue
            width = max(longest, len(job.input_ids))
            if len(chosen) == self.max_batch_requests or (len(chosen) + 1) * width > self.max_batch_tokens:
                left_out = True
                continue
            chosen.append(job)
            longest = width
        full = left_out or len(chosen) == self.max_batch_requests or len(chosen) * longest >= self.max_batch_tokens
        return chosen, full

    def _next_batch(self) -> list[Job] | None:
        """Wait for a batch that is full, or whose oldest job waited ``max_wait``, and take it off the queue;
        ``None`` once closed with nothing left."""
        with self._condition:
            while True:
                if not self._jobs:
                    if self._closing:
                        return None
                    self._condition.wait()
                    continue
                chosen, full = self._select()
                left = self._jobs[0].arrival + self.max_wait - time.perf_counter()
                if full or left <= 0 or self._closing:
                    taken = {id(job) for job in chosen}
                    self._jobs = [job for job in self._jobs if id(job) not in taken]
                    self.metrics.add_queued(-len(chosen))
                    return chosen
                self._condition.wait(left)

    def _work(self) -> None:
        trimmed = time.perf_counter()
        while (chosen := self._next_batch()) is not None:
            live = [job for job in chosen if job.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)
            if not self._jobs and time.perf_counter() - trimmed > TRIM_INTERVAL:
                release_free_memory()  # the queue drained: the heap grown by a burst goes back to the system
                trimmed = time.perf_counter()

    def _run(self, jobs: list[Job]) -> None:
        """Run ``jobs`` sorted longest first and hand each its outcome."""
        lengths = [len(job.input_ids) for job in jobs]
        (order,) = token_budget_batches(lengths, None, len(jobs))
        ordered = [jobs[i] for i in order]
        start = time.perf_counter()
        try:
            outcomes = self.run(ordered, ordered[0].knobs)
        except Exception as error:  # noqa: BLE001 - any failure of a pass fails its batch only, the server goes on
            message = " ".join(f"{type(error).__name__}: {error}".split())
            outcomes = [InferenceError(f"the model failed on this batch ({message})")] * len(ordered)
        seconds = time.perf_counter() - start
        self.metrics.batch(len(ordered), len(ordered) * max(lengths), seconds, [start - job.arrival for job in jobs])
        for job, outcome in zip(ordered, outcomes, strict=True):
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                self.metrics.text(outcome.exit_layer, outcome.tokens, outcome.kept)
                job.future.set_result(outcome)
