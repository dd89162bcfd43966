"""``mp serve``'s model in a process of its own (``--model-worker process``, the default).

The server's process holds the event loop, the HTTP layer, the tokenizer and the batcher's queue; the model runs in
a child process started with ``spawn``, which loads it as a one-process server would (``serve.load_classifier``:
device, threads, warm-up, on CUDA the GPU engine's graphs) and then answers one batch at a time over a pipe. Why:
in one process the model's many small torch calls on the packed path take and give back the GIL between calls,
and each time the event loop holds it the model waits (``bench/NOTES.md``, "mp serve under load"); in its own
process the model never waits for the interpreter. A batch crosses the pipe as token ids and comes back as
``Scores``: a few kilobytes, tens of microseconds.

``ModelProcess`` stands for ``serve_batching.Classifier`` in the server: the same ``encode`` (in the server's process,
with its own tokenizer), ``forward`` (sent to the child), ``labels``, ``layers``, ``max_length``, ``device``,
``dtype`` and ``dense_hf``, and the ``options`` the child resolved (the default ``tau`` is the model's). If the
child dies, the batch in flight and every later one fail with ``InferenceError`` (424) and ``alive`` turns false
(``/health`` answers 503). The child ignores SIGINT and SIGTERM: the server drains first, then ``close`` ends it;
if the server dies, the child reads the end of the pipe and exits.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mp_model.recipe.serve_batching import InferenceError, Job, Knobs, Scores, encode_texts

READY, FAILED = "ready", "failed"


def _child(connection: Any, settings: dict[str, Any], folder: Path) -> None:
    """The child process: load the model, announce its facts (or the error), then run batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from mp_model.recipe.serve import load_classifier

    try:
        classifier, options = load_classifier(argparse.Namespace(**settings), folder)
    except Exception as error:  # noqa: BLE001 - any failure to load goes back to the server as one line
        connection.send((FAILED, " ".join(f"{type(error).__name__}: {error}".split())))
        return
    connection.send((READY, (classifier.facts(), options)))
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        encoded, knobs = message
        try:
            outcomes = classifier.forward([Job(ids, types, knobs) for ids, types in encoded], knobs)
        except Exception as error:  # noqa: BLE001 - the batch fails, the child goes on
            outcomes = (FAILED, " ".join(f"{type(error).__name__}: {error}".split()))
        connection.send(outcomes)


class ModelProcess:
    """The model behind a pipe to a child process; the server's side of it (see the module docstring).

    Args:
        settings: ``mp serve``'s parsed flags (``vars(args)`` without the handler).
        folder: the model's folder.
        tokenizer: the model's tokenizer, for ``encode`` in the server's process.

    Raises:
        ValueError: the child could not load the model (its error, in one line).
    """

    def __init__(self, settings: dict[str, Any], folder: Path, tokenizer: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_child, args=(child_end, settings, folder), name="mp-serve-model")
        self._process.daemon = True
        self._process.start()
        child_end.close()
        self._lock = threading.Lock()
        try:
            status, payload = self._connection.recv()
        except EOFError:
            self._process.join(5)
            status, payload = FAILED, f"the model process exited with code {self._process.exitcode}"
        if status != READY:
            self._process.join(5)
            raise ValueError(f"mp serve could not load the model: {payload}")
        facts, self.options = payload
        self.tokenizer = tokenizer
        self.labels: list[str] = facts["labels"]
        self.layers: int = facts["layers"]
        self.max_length: int = facts["max_length"]
        self.device: str = facts["device"]
        self.dtype: str = facts["dtype"]
        self.dense_hf: bool = facts["dense_hf"]
        self.worker = "process"

    @property
    def alive(self) -> bool:
        """Whether the child process runs."""
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def encode(self, texts: Sequence[tuple[str, str | None]], truncate: bool) -> list[tuple[list[int], list[int]]]:
        """As ``Classifier.encode``, in the server's process."""
        return encode_texts(self.tokenizer, self.max_length, texts, truncate)

    def forward(self, jobs: Sequence[Job], knobs: Knobs) -> list[Scores | InferenceError]:
        """As ``Classifier.forward``, in the child: one outcome per job, in order; a ``RuntimeError`` if the pass
        failed or the child is gone (the batcher answers the batch's jobs with 424)."""
        with self._lock:
            try:
                self._connection.send(([(job.input_ids, job.token_type_ids) for job in jobs], knobs))
                outcomes = self._connection.recv()
            except (EOFError, OSError) as error:
                self._process.join(1)  # the pipe closes as the child exits: reap it, so that ``alive`` is false
                raise RuntimeError(f"the model process is gone (exit code {self._process.exitcode})") from error
        if isinstance(outcomes, tuple):
            raise RuntimeError(outcomes[1])
        return outcomes

    def close(self, timeout: float = 30) -> None:
        """Tell the child to stop once its batch is done, and wait up to ``timeout`` seconds (then kill it)."""
        with self._lock:
            try:
                self._connection.send(None)
            except OSError:
                pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()
