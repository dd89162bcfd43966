"""Specification of ``mp serve``'s batcher (``mp_model.recipe.serve_batching.Batcher``), in process: batches hold
jobs of one setting of the knobs within the token and text budgets, sorted longest first; an exception in a pass
fails that batch's jobs only; ``close`` answers every job already queued."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from mp_model.recipe.serve_batching import Batcher, InferenceError, Job, Knobs, Scores
from mp_model.recipe.serve_metrics import ServeMetrics

SLOW, FAST = Knobs(0.3, 1.0), Knobs(0.9, 1.0)


class Recorder:
    """A runner that records its batches, answers each job with its length, and fails batches holding a 13."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], Knobs]] = []
        self.gate = threading.Event()

    def __call__(self, jobs: Sequence[Job], knobs: Knobs) -> list[Scores | InferenceError]:
        self.gate.wait(10)
        lengths = [len(job.input_ids) for job in jobs]
        self.batches.append((lengths, knobs))
        if 13 in lengths:
            raise RuntimeError("boom")
        return [Scores([float(n)], 1, n, n) for n in lengths]


def jobs(lengths: Sequence[int], knobs: Knobs = SLOW) -> list[Job]:
    return [Job([0] * n, [0] * n, knobs) for n in lengths]


def run(lengths_and_knobs: Sequence[tuple[Sequence[int], Knobs]], **limits: int) -> tuple[Recorder, list[Job]]:
    """Queue every job while the runner is held, then let it go and close the batcher."""
    recorder = Recorder()
    options = {"max_batch_tokens": 64, "max_batch_requests": 4} | limits
    batcher = Batcher(recorder, ServeMetrics(3), max_wait=0.05, **options)
    queued = [job for lengths, knobs in lengths_and_knobs for job in jobs(lengths, knobs)]
    batcher.submit(queued[:1])  # the worker takes it and waits at the gate while the rest queue up
    batcher.submit(queued[1:])
    recorder.gate.set()
    batcher.close(10)
    return recorder, queued


def test_batches_respect_the_budgets_and_the_knobs_and_run_longest_first() -> None:
    recorder, queued = run([([5, 9, 3, 30, 2, 8], SLOW), ([4, 6], FAST), ([7], SLOW)])
    assert all(job.future.done() for job in queued)
    assert [job.future.result().logits[0] for job in queued] == [len(job.input_ids) for job in queued]
    for lengths, _ in recorder.batches:
        assert len(lengths) <= 4 and (len(lengths) * max(lengths) <= 64 or len(lengths) == 1)
        assert lengths == sorted(lengths, reverse=True)
    seen = sorted((n, knobs.tau) for lengths, knobs in recorder.batches for n in lengths)
    assert seen == sorted((len(job.input_ids), job.knobs.tau) for job in queued)


def test_a_text_over_the_token_budget_runs_alone() -> None:
    recorder, _ = run([([2], SLOW), ([100, 3], SLOW)])
    assert ([100], SLOW) in recorder.batches


def test_a_failing_pass_fails_its_own_jobs_only() -> None:
    recorder, queued = run([([1], SLOW), ([13, 2], FAST), ([5], SLOW)])
    failed = [job for job in queued if job.knobs == FAST]
    assert all(isinstance(job.future.exception(), InferenceError) for job in failed)
    assert "RuntimeError: boom" in str(failed[1].future.exception())
    assert [job.future.result().logits for job in queued if job.knobs == SLOW] == [[1.0], [5.0]]


def test_closed_batcher_refuses_jobs() -> None:
    batcher = Batcher(Recorder(), ServeMetrics(3), max_batch_tokens=8, max_batch_requests=2, max_wait=0)
    batcher.close(10)
    assert not batcher.alive
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(jobs([3]))
