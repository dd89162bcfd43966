"""Specification of ``mp serve`` (``mp_model.recipe.serve``), over HTTP: the real server runs in a subprocess on a
free port and a plain ``urllib`` client talks to it. Answers equal the model called in process on the same text
with the same knobs; every bad input gets its status and a one-line message and the server goes on serving; beyond
``--max-concurrent-requests`` requests get 429; SIGTERM answers every request already accepted, then exits 0."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.utils import BAD, FILLER, GOOD, minilm_tokenizer, write_tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

POISON = "zebra"  # its embedding is NaN in the served model: a text holding it makes the model fail (424)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``mp serve`` in a subprocess, its output in a log file."""

    def __init__(self, folder: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "mp_model.recipe.cli", "serve", "--checkpoint", str(folder)]
        command += ["--port", str(self.port), "--threads", "1", *flags]
        with log.open("w") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mp serve exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"mp serve did not start in {timeout} s: {self.log.read_text()}")

    def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, Any, dict]:
        """``(status, body as JSON (text if not JSON), headers)`` of one request."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw, headers = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            status, raw, headers = error.code, error.read(), dict(error.headers)
        try:
            return status, json.loads(raw), headers
        except ValueError:
            return status, raw.decode(), headers

    def predict(self, payload: Any) -> tuple[int, Any, dict]:
        return self.call("POST", "/predict", json.dumps(payload).encode())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = FILLER + GOOD + BAD
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model, with the embedding of ``POISON`` set to NaN."""
    from safetensors.torch import load_file, save_file

    folder = write_tiny_model(tmp_path_factory.mktemp("serve") / "model")
    weights = load_file(folder / "model.safetensors")
    weights["bert.embeddings.word_embeddings.weight"][minilm_tokenizer().convert_tokens_to_ids(POISON)] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "checksums.json").unlink()  # edited by hand: no longer the files of one save
    return folder


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Three servers started together: ``main`` (defaults: the model in its own process; 4 inputs a request at
    most, 64 KB bodies), ``thread`` (the model in a thread of the server) and ``held`` (3 requests in flight at
    most, batches waiting 1.5 s to fill)."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "main": Server(model_dir, logs / "main.log", "--max-client-batch-size", "4", "--max-body-bytes", "65536"),
        "thread": Server(model_dir, logs / "thread.log", "--max-client-batch-size", "4", "--model-worker", "thread"),
        "held": Server(model_dir, logs / "held.log", "--max-concurrent-requests", "3", "--max-wait-ms", "1500"),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@functools.cache
def loaded(folder: Path) -> Any:
    from mp_model.recipe.runs import load_model

    return load_model(folder).eval()


def in_process(folder: Path, text: str | tuple[str, str], tau: float, scale: float) -> list[float]:
    """Softmax probabilities of ``model(...)`` on ``text`` alone, with ``tau`` and ``threshold_scale=scale``."""
    model = loaded(folder)
    parts = [text] if isinstance(text, str) else list(text)
    encoded = minilm_tokenizer()(*parts, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        out = model(
            encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], tau=tau, threshold_scale=scale
        )
    return out.logits.float().softmax(dim=-1)[0].tolist()


def by_label(predictions: list[dict]) -> list[float]:
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    return [score for _, score in sorted((p["label"], p["score"]) for p in predictions)]


@pytest.mark.parametrize("name", ["main", "thread"])
def test_answers_equal_the_model_in_process_whatever_the_batch(
    servers: dict[str, Server], model_dir: Path, name: str
) -> None:
    server = servers[name]
    texts = sentences(12)
    knobs = [{}, {"tau": 0.9, "threshold_scale": 2.0}, {"tau": 0.0}]
    payloads = [{"inputs": text} | knobs[i % 3] for i, text in enumerate(texts)]
    payloads += [{"inputs": texts[:3]}, {"inputs": ["a good film", "an awful plot"]}, {"inputs": [["good"], ["bad"]]}]
    with ThreadPoolExecutor(len(payloads)) as pool:  # concurrent: requests share batches
        answers = list(pool.map(server.predict, payloads))
    assert [status for status, _, _ in answers] == [200] * len(payloads)
    for payload, (_, body, headers) in zip(payloads[:12], answers, strict=False):
        expected = in_process(
            model_dir, payload["inputs"], payload.get("tau", 0.3), payload.get("threshold_scale", 1.0)
        )
        assert by_label(body) == pytest.approx(expected, abs=1e-5)
        assert 1 <= int(headers["x-mp-exit-layers"]) <= 3
    (_, batch, _), (_, pair, _), (_, two, _) = answers[12:]
    for text, answer in zip(texts[:3], batch, strict=True):
        assert by_label(answer) == pytest.approx(in_process(model_dir, text, 0.3, 1.0), abs=1e-5)
    assert by_label(pair) == pytest.approx(in_process(model_dir, ("a good film", "an awful plot"), 0.3, 1.0), abs=1e-5)
    assert len(two) == 2 and by_label(two[0]) == pytest.approx(in_process(model_dir, "good", 0.3, 1.0), abs=1e-5)


def test_raw_scores_are_logits_and_truncate_cuts_long_texts(servers: dict[str, Server]) -> None:
    server = servers["main"]
    _, probabilities, _ = server.predict({"inputs": "a moving story"})
    _, logits, _ = server.predict({"inputs": "a moving story", "raw_scores": True})
    values = torch.tensor(by_label(logits))
    assert by_label(probabilities) == pytest.approx(values.softmax(dim=0).tolist(), abs=1e-6)
    long = "the film " * 100
    status, body, _ = server.predict({"inputs": long})
    assert status == 413 and "more than 64 tokens" in body["error"]
    assert server.predict({"inputs": long, "truncate": True})[0] == 200


BAD_INPUTS = [
    pytest.param(b'{"inputs": "a', 422, "not valid JSON", id="malformed-json"),
    pytest.param(b'{"inputs": 5}', 422, "inputs must be a text", id="number-as-inputs"),
    pytest.param(b'{"inputs": ["a", 7, "b"]}', 422, "inputs must be a text", id="number-in-list"),
    pytest.param(b'{"inputs": [["a", "b", "c"]]}', 422, "inputs[0] must be a text or a [text, text_pair]", id="triple"),
    pytest.param(
        b'{"inputs": "a", "raw_scores": "yes"}', 422, "raw_scores: Input should be a valid boolean", id="bool"
    ),
    pytest.param(b'{"inputs": "a", "tau": 1.5}', 422, "tau: Input should be less than or equal to 1", id="tau"),
    pytest.param(
        b'{"inputs": "a", "threshold_scale": -1}', 422, "threshold_scale: Input should be greater", id="scale"
    ),
    pytest.param(b'{"inputs": "a", "colour": 1}', 422, "colour: Extra inputs are not permitted", id="extra-field"),
    pytest.param(b'{"text": "a"}', 422, "inputs: Field required", id="no-inputs"),
    pytest.param(b"[1, 2]", 422, "Input should be a valid dictionary", id="not-an-object"),
    pytest.param(b'{"inputs": []}', 422, "inputs is an empty list", id="empty-list"),
    pytest.param(b'{"inputs": "  "}', 422, "inputs[0] holds an empty text", id="empty-text"),
    pytest.param(b'{"inputs": "caf\xe9"}', 422, "not valid UTF-8 (byte 15)", id="invalid-utf8"),
    pytest.param(
        b'{"inputs": "bad \\ud800"}',
        422,
        "inputs holds a lone surrogate (U+D800), which is not valid Unicode text",
        id="lone-surrogate",
    ),
    pytest.param(
        b'{"inputs": ["a", "b", "c \\udc00"]}', 422, "inputs[2] holds a lone surrogate (U+DC00)", id="in-list"
    ),
    pytest.param(b'{"inputs": [["a", "b \\ud83d"]]}', 422, "inputs[0][1] holds a lone surrogate", id="in-pair"),
    pytest.param(b'{"inputs": "' + b"a" * 10_000_000 + b'"}', 413, "more than the limit of 65536", id="10MB-body"),
    pytest.param(json.dumps({"inputs": ["a"] * 100_000}).encode(), 413, "more than the limit", id="100k-inputs"),
    pytest.param(json.dumps({"inputs": ["a"] * 5}).encode(), 413, "holds 5 texts, more than the 4", id="5-inputs"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_INPUTS)
def test_bad_input_gets_its_status_and_a_one_line_message(
    servers: dict[str, Server], body: bytes, status: int, message: str
) -> None:
    server = servers["main"]
    got, answer, _ = server.call("POST", "/predict", body)
    assert (got, answer["error_type"]) == (status, "validation")
    assert message in answer["error"] and "\n" not in answer["error"]
    assert server.predict({"inputs": "still serving"})[0] == 200


def test_a_surrogate_pair_is_one_character_and_is_served(servers: dict[str, Server]) -> None:
    body = json.dumps({"inputs": "a film \U0001f600"}).encode()  # ASCII JSON: the emoji as "\\ud83d\\ude00"
    assert b"\\ud83d\\ude00" in body and servers["main"].call("POST", "/predict", body)[0] == 200


def test_a_failing_text_gets_424_and_other_requests_their_answers(servers: dict[str, Server]) -> None:
    server = servers["main"]
    payloads = [{"inputs": f"a {POISON} film"}, {"inputs": "a good film"}, {"inputs": [f"{POISON} story", "plot"]}]
    with ThreadPoolExecutor(3) as pool:
        (bad, _, _), (good, _, _), (mixed, answer, _) = pool.map(server.predict, payloads)
    assert (bad, good, mixed) == (424, 200, 424)
    assert answer["error_type"] == "backend" and "non-finite" in answer["error"]
    assert server.call("GET", "/health")[0] == 200 and server.predict({"inputs": "plot"})[0] == 200


def test_info_metrics_and_openapi_describe_the_server(servers: dict[str, Server]) -> None:
    server = servers["main"]
    _, info, _ = server.call("GET", "/info")
    assert info["model_type"]["classifier"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert (info["max_input_length"], info["max_client_batch_size"], info["layers"]) == (64, 4, 3)
    assert (info["model_worker"], servers["thread"].call("GET", "/info")[1]["model_worker"]) == ("process", "thread")
    status, metrics, headers = server.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for line in ('mp_requests_total{status="200"}', 'mp_requests_total{status="422"}', "mp_queue_depth 0"):
        assert line in metrics
    for name in ("mp_batch_tokens_bucket", "mp_batch_texts_count", "mp_mean_exit_layer", "mp_kept_token_share"):
        assert name in metrics
    assert "mp_request_duration_seconds_bucket" in metrics and "mp_inference_duration_seconds_sum" in metrics
    _, schema, _ = server.call("GET", "/openapi.json")
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"inputs", "raw_scores", "truncate", "tau", "threshold_scale"} <= set(body["properties"])
    assert {"/info", "/health", "/metrics"} <= set(schema["paths"])


def test_requests_beyond_the_concurrency_limit_get_429(servers: dict[str, Server]) -> None:
    server = servers["held"]  # batches wait 1.5 s to fill: the first 3 requests stay in flight
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(server.predict, [{"inputs": f"text {i}"} for i in range(8)]))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 3 + [429] * 5
    assert all(body["error_type"] == "overloaded" for status, body, _ in answers if status == 429)


def model_processes(pid: int) -> list[int]:
    """The process ids of the children of ``pid`` started by ``multiprocessing``'s spawn (Linux; the resource
    tracker, another child, is left out)."""
    children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def test_a_dead_model_process_gets_424_and_health_503(model_dir: Path, tmp_path: Path) -> None:
    server = Server(model_dir, tmp_path / "dying.log")
    try:
        server.wait_ready()
        assert server.predict({"inputs": "a good film"})[0] == 200
        (child,) = model_processes(server.process.pid)
        os.kill(child, signal.SIGKILL)
        status, answer, _ = server.predict({"inputs": "a good film"})
        assert status == 424 and answer["error_type"] == "backend" and "model process is gone" in answer["error"]
        assert server.call("GET", "/health")[0] == 503
    finally:
        server.stop()


def test_sigterm_answers_every_accepted_request_then_exits_0(servers: dict[str, Server]) -> None:
    server = servers["held"]
    (model_process,) = model_processes(server.process.pid)
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(server.predict, {"inputs": f"text {i}"}) for i in range(3)]
        deadline = time.monotonic() + 5
        while "mp_requests_in_flight 3" not in server.call("GET", "/metrics")[1]:
            assert time.monotonic() < deadline, "the requests were not accepted"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        assert [future.result()[0] for future in pending] == [200] * 3
    assert server.process.wait(20) == 0
    with pytest.raises(OSError):
        server.call("GET", "/health", timeout=2)
    assert not Path(f"/proc/{model_process}").exists()  # the model's process ended with the server


def test_mp_serve_refuses_a_missing_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mp_model.recipe.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none")]) == 2
    assert (
        capsys.readouterr().err
        == f"mp serve: error: no model at --checkpoint {tmp_path / 'none'}: run `mp train` first or pass --checkpoint\n"
    )
    assert main(["serve", "--checkpoint", str(tmp_path), "--max-batch-tokens", "0"]) == 2
    assert "--max-batch-tokens" in capsys.readouterr().err
