"""Specification of ``mp serve``'s model process (``mp_model.recipe.serve_worker.ModelProcess``), without HTTP: it
answers a batch exactly as the model's ``Classifier`` does in process, with the options and facts the child
resolved; a model that cannot load is a one-line ``ValueError``; a failing pass fails that batch and the child goes
on; a dead child makes every batch a ``RuntimeError`` and ``alive`` false; ``close`` ends the child."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mp_model.recipe.serve import configure_serve
from mp_model.recipe.serve_batching import Classifier, Job, Knobs, Scores
from mp_model.recipe.serve_worker import ModelProcess
from tests.utils import minilm_tokenizer, write_tiny_model

KNOBS = Knobs(0.3, 1.0)


def settings(folder: Path, *flags: str) -> dict:
    parser = argparse.ArgumentParser()
    configure_serve(parser)
    return vars(parser.parse_args(["--checkpoint", str(folder), "--threads", "1", *flags]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("worker") / "model")


@pytest.fixture(scope="module")
def worker(model_dir: Path) -> Iterator[ModelProcess]:
    process = ModelProcess(settings(model_dir, "--tau", "0.5"), model_dir, minilm_tokenizer())
    try:
        yield process
    finally:
        process.close()


def test_a_batch_gets_the_outcomes_of_the_model_in_process(worker: ModelProcess, model_dir: Path) -> None:
    from mp_model.recipe.runs import load_model

    local = Classifier(load_model(model_dir), minilm_tokenizer(), max_length=worker.max_length)
    texts = [("a good film", None), ("an awful, boring and long plot", None), ("good", "bad")]
    encoded = worker.encode(texts, truncate=True)
    assert encoded == local.encode(texts, truncate=True)
    for knobs in (KNOBS, Knobs(0.9, 2.0)):
        jobs = [Job(ids, types, knobs) for ids, types in encoded]
        remote, here = worker.forward(jobs, knobs), local.forward(jobs, knobs)
        assert all(isinstance(outcome, Scores) for outcome in remote)
        for a, b in zip(remote, here, strict=True):
            assert (a.exit_layer, a.tokens, a.kept) == (b.exit_layer, b.tokens, b.kept)
            assert a.logits == pytest.approx(b.logits, abs=1e-6)
    assert (worker.labels, worker.layers, worker.device, worker.dtype) == (local.labels, 3, "cpu", "float32")
    assert worker.options.tau == 0.5 and worker.dense_hf is False and worker.alive


def test_a_failing_pass_fails_its_batch_and_the_child_goes_on(worker: ModelProcess) -> None:
    bad = Job([10**9, 101], [0, 0], KNOBS)  # a token id past the vocabulary: the model refuses it
    with pytest.raises(RuntimeError, match="^ValueError: input_ids must lie in"):
        worker.forward([bad], KNOBS)
    ((ids, types),) = worker.encode([("still serving", None)], truncate=True)
    (outcome,) = worker.forward([Job(ids, types, KNOBS)], KNOBS)
    assert isinstance(outcome, Scores) and worker.alive


def test_a_model_that_cannot_load_is_a_one_line_value_error(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="^mp serve could not load the model: ") as caught:
        ModelProcess(settings(broken), broken, minilm_tokenizer())
    assert "\n" not in str(caught.value)


def test_a_dead_child_fails_every_batch_and_is_not_alive(model_dir: Path) -> None:
    process = ModelProcess(settings(model_dir), model_dir, minilm_tokenizer())
    os.kill(process.pid, signal.SIGKILL)
    ((ids, types),) = process.encode([("anyone there", None)], truncate=True)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the model process is gone"):
            process.forward([Job(ids, types, KNOBS)], KNOBS)
    assert not process.alive
    process.close()


def test_close_ends_the_child_and_it_ignores_sigint_and_sigterm(model_dir: Path) -> None:
    process = ModelProcess(settings(model_dir), model_dir, minilm_tokenizer())
    os.kill(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group: the server drains first
    os.kill(process.pid, signal.SIGTERM)
    ((ids, types),) = process.encode([("still here", None)], truncate=True)
    assert isinstance(process.forward([Job(ids, types, KNOBS)], KNOBS)[0], Scores)
    process.close(10)
    assert not process.alive
