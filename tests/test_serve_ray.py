"""Specification of ``mp serve --replicas`` (``mp_model.recipe.serve_ray``): the same application as ``mp serve``,
served by Ray Serve. The real command runs in a subprocess (its own local Ray instance) with two replicas of half a
CPU each, and a plain ``urllib`` client talks to it over HTTP: its answers equal the model called in process, each
replica is a process of its own holding the model, and SIGTERM answers the requests in flight, stops Ray and exits
0. Wrong replica flags are one-line errors, with Ray Serve or without; the server's tests are skipped without it
(the ``[ray]`` extra)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.utils import write_tiny_model

pytest.importorskip("fastapi")

from tests.test_serve import Server, by_label, free_port, in_process, sentences  # noqa: E402

with warnings.catch_warnings():  # Ray Serve's own deprecation warnings
    warnings.simplefilter("ignore")
    try:
        import ray.serve  # noqa: F401

        HAVE_RAY_SERVE = True
    except ImportError:
        HAVE_RAY_SERVE = False
needs_ray_serve = pytest.mark.skipif(not HAVE_RAY_SERVE, reason="Ray Serve is the [ray] extra")

REPLICA = "ray::ServeReplica:mp-serve"  # the process title Ray gives a replica of the application mp-serve


def descendants(pid: int) -> dict[int, str]:
    """The command lines of the processes below ``pid`` (Ray's head processes, its workers and actors) by id."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(parent, []).append(int(entry.name))
    found, stack = {}, list(parents.get(pid, []))
    while stack:
        child = stack.pop()
        stack += parents.get(child, [])
        try:
            found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return found


class RayServer(Server):
    """``mp serve --replicas 2 --cpus-per-replica 0.5`` in a subprocess and a session of its own, on a new local Ray
    instance (``RAY_ADDRESS`` unset); batches wait up to 2 s to fill, so that requests stay in flight a while."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "mp_model.recipe.cli", "serve", "--checkpoint", str(folder)]
        command += ["--port", str(self.port), "--threads", "1", "--max-wait-ms", "2000"]
        command += ["--replicas", "2", "--cpus-per-replica", "0.5"]
        env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float = 150) -> None:
        """Until the command announces its address (it does once Ray Serve reports every replica running)."""
        deadline = time.monotonic() + timeout
        while "mp serve: " not in self.log.read_text():
            if self.process.poll() is not None:
                pytest.fail(f"mp serve exited with {self.process.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mp serve --replicas did not start in {timeout} s: {self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill what is left of the command's session (nothing, after a clean SIGTERM)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("serve_ray") / "model")


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    started = RayServer(model_dir, tmp_path_factory.mktemp("logs") / "ray.log")
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@needs_ray_serve
def test_two_replicas_each_hold_the_model_and_answer_health_and_info(server: RayServer) -> None:
    assert sum(line.startswith(REPLICA) for line in descendants(server.process.pid).values()) == 2
    assert "2 replicas on a local Ray instance" in server.log.read_text()
    assert server.call("GET", "/health")[0] == 200
    status, info, _ = server.call("GET", "/info")
    assert status == 200 and (info["layers"], info["max_input_length"], info["device"]) == (3, 64, "cpu")


@needs_ray_serve
def test_answers_equal_the_model_in_process(server: RayServer, model_dir: Path) -> None:
    tau = server.call("GET", "/info")[1]["tau"]  # the model's exit_tau
    texts = sentences(10, seed=1)
    knobs = [{}, {"tau": 0.9, "threshold_scale": 2.0}]
    payloads = [{"inputs": text} | knobs[i % 2] for i, text in enumerate(texts)] + [{"inputs": texts[:3]}]
    with ThreadPoolExecutor(len(payloads)) as pool:  # concurrent: the router spreads them over the replicas
        answers = list(pool.map(server.predict, payloads))
    assert [status for status, _, _ in answers] == [200] * len(payloads)
    for payload, (_, body, headers) in zip(payloads, answers[:-1], strict=False):
        expected = in_process(model_dir, payload["inputs"], payload.get("tau", tau), payload.get("threshold_scale", 1))
        assert by_label(body) == pytest.approx(expected, abs=1e-5)
        assert 1 <= int(headers["x-mp-exit-layers"]) <= 3
    for text, answer in zip(texts[:3], answers[-1][1], strict=True):
        assert by_label(answer) == pytest.approx(in_process(model_dir, text, tau, 1.0), abs=1e-5)
    status, body, _ = server.predict({"inputs": ""})
    assert (status, body["error_type"]) == (422, "validation")


@needs_ray_serve
def test_sigterm_answers_the_requests_in_flight_stops_ray_and_exits_0(server: RayServer) -> None:
    ray_processes = descendants(server.process.pid)
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(server.predict, {"inputs": f"text {i}"}) for i in range(3)]
        time.sleep(1)  # accepted by now: their batches wait 2 s to fill
        server.process.send_signal(signal.SIGTERM)
        assert [future.result()[0] for future in pending] == [200] * 3
    assert server.process.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [line for pid, line in ray_processes.items() if Path(f"/proc/{pid}").exists()]
    with pytest.raises(OSError):
        server.call("GET", "/health", timeout=2)


FLAG_ERRORS = [
    pytest.param(["--cpus-per-replica", "1"], "--cpus-per-replica needs --replicas", id="cpus-without-replicas"),
    pytest.param(["--replicas", "0"], "--replicas must be an integer >= 1, got 0", id="no-replicas"),
    pytest.param(["--replicas", "1", "--cpus-per-replica", "-1"], "--cpus-per-replica must be", id="negative-cpus"),
    pytest.param(["--replicas", "1", "--gpus-per-replica", "1"], "needs --device cuda", id="gpus-on-cpu"),
    pytest.param(["--replicas", "1", "--device", "cuda:1"], "with --replicas use --device cuda", id="cuda-index"),
]


@pytest.mark.parametrize(("flags", "message"), FLAG_ERRORS)
def test_wrong_replica_flags_are_one_line_errors(
    model_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    from mp_model.recipe.cli import main

    assert main(["serve", "--checkpoint", str(model_dir), *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mp serve: error: ") and message in error and error.count("\n") == 1


def test_replicas_without_ray_serve_say_how_to_install_it(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mp_model.recipe.cli import main

    monkeypatch.setitem(sys.modules, "ray.serve", None)  # as if ray[serve] were not installed
    assert main(["serve", "--checkpoint", str(model_dir), "--replicas", "2"]) == 2
    assert capsys.readouterr().err == (
        "mp serve: error: mp serve --replicas needs Ray Serve (ray[serve] >= 2.47): pip install 'magic-pyramid[ray]'\n"
    )


@needs_ray_serve
def test_replicas_beyond_the_local_machine_are_refused_in_one_line(model_dir: Path) -> None:
    command = [sys.executable, "-m", "mp_model.recipe.cli", "serve", "--checkpoint", str(model_dir)]
    command += ["--replicas", "2", "--cpus-per-replica", "10000"]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(
        "mp serve: error: --replicas 2 x --cpus-per-replica 10000 need 20000 CPUs, this machine has "
    )
