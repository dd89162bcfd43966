"""The GPU suite's tests step (``bench.gpu_suite``, step 1), and ``run_step``, the time-limited subprocess every
step runs in: no kernel fault can spoil the test run.

Three sub-runs, each with its own time limit: (a) the ``out_of_range`` tests, each in its own pytest process,
``ISOLATED_PARALLEL`` at a time (a fault kills only itself, and is reported by name); (b) the rest in one process
that stops after a CUDA error (``--stop-on-cuda-error``), a fresh process then going on with the tests not yet run,
up to ``MAIN_ROUNDS`` processes; (c) where ``compute-sanitizer`` exists, the kernels' test files under its memcheck
tool. Every test of (a) and (b) appends its outcome to ``tests-outcomes.jsonl`` (``bench.outcome_log``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from pathlib import Path
from typing import IO, Any

from bench.outcome_log import CUDA_ERROR, count_outcomes, read_outcomes

ROOT = Path(__file__).resolve().parent.parent
TAIL_LINES = 15
FAILED_NAMES = 30
# The tests step's sub-runs: isolated out-of-range tests (seconds each, all of them), the sanitizer; the rest of the
# step's time goes to the main run. Kernel test files for compute-sanitizer, the bounds checks first.
ISOLATED_TEST_S, ISOLATED_S, SANITIZER_S = 60, 60, 40
ISOLATED_PARALLEL = 16  # the GPU machine has 16 cores; 80 tests of about 10 s each fit the 60 s given to them
MAIN_ROUNDS = 3
SANITIZED = ("kernel_bounds", "add_layer_norm", "rows_linear", "compaction", "compact_tokens", "early_exit")
SANITIZED += ("exit_step", "semaphores", "attention")


def pump(source: IO[str], sink: IO[str], log: IO[str], lock: threading.Lock, tail: deque[str]) -> None:
    """Copy ``source`` line by line to ``sink`` and ``log``, keeping the last lines in ``tail``."""
    for line in source:
        with lock:
            sink.write(line)
            sink.flush()
            log.write(line)
        tail.append(line.rstrip("\n"))


def run_step(name: str, command: list[str], limit: float, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` in the repository root within ``limit`` seconds, teeing its output into ``out/<name>.log``."""
    record: dict[str, Any] = {"command": shlex.join(command), "limit_s": round(limit, 1), "log": f"{name}.log"}
    begin = time.monotonic()
    tails: tuple[deque[str], deque[str]] = (deque(maxlen=TAIL_LINES), deque(maxlen=TAIL_LINES))
    lock = threading.Lock()
    with (out / f"{name}.log").open("w") as log:
        log.write(f"$ {record['command']}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        readers = [
            threading.Thread(target=pump, args=(process.stdout, sys.stdout, log, lock, tails[0])),
            threading.Thread(target=pump, args=(process.stderr, sys.stderr, log, lock, tails[1])),
        ]
        for reader in readers:
            reader.start()
        try:
            record["returncode"] = process.wait(timeout=limit)
            record["status"] = "ok" if record["returncode"] == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step's own process group (its session)
            record["returncode"] = process.wait()
            record["status"] = "timed out"
        for reader in readers:
            reader.join(timeout=10)
    record["wall_s"] = round(time.monotonic() - begin, 1)
    if record["status"] != "ok":  # pytest reports its failures on stdout
        record["stderr_tail" if tails[1] else "stdout_tail"] = list(tails[1] or tails[0])
    return record


def junit_counts(path: Path) -> dict[str, Any] | None:
    """``passed``, ``failed``, ``skipped``, ``errors`` and the first failing tests' names from a pytest junit XML
    file (None if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    cases = [
        case for case in root.iter("testcase") if case.find("failure") is not None or case.find("error") is not None
    ]
    bad = [f"{case.get('classname')}::{case.get('name')}" for case in cases]
    counts = {"passed": passed, "failed": total["failures"], "skipped": total["skipped"], "errors": total["errors"]}
    return counts | {"failed_tests": bad[:FAILED_NAMES]}


def pytest_command(out: Path) -> list[str]:
    """``python -m pytest`` with the outcome log on ``out/tests-outcomes.jsonl``."""
    log = out / "tests-outcomes.jsonl"
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "bench.outcome_log", f"--outcome-log={log}"]


def collect(command: list[str], env: dict[str, str], limit: float) -> dict[str, str]:
    """The tests ``command`` (a pytest command line) would run: ``{run id: node id}``, the run id naming the test
    by its file's absolute path (it runs from any folder), as ``bench.outcome_log`` lists them."""
    with tempfile.TemporaryDirectory() as folder:
        listing = Path(folder) / "collected.jsonl"
        try:
            subprocess.run(
                [*command, "--collect-only", f"--outcome-log={listing}"], cwd=ROOT, env=env, capture_output=True,
                timeout=limit,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {}
        records = read_outcomes(listing).values()
        return {r["run_id"]: r["nodeid"] for r in records if r["outcome"] == "collected"}


def run_isolated(command: list[str], ids: list[str], limit: float, env: dict[str, str]) -> dict[str, Any]:
    """Each of ``ids`` in its own ``command`` process, ``ISOLATED_PARALLEL`` at a time, ``ISOLATED_TEST_S`` each,
    all within ``limit`` seconds; returns the status, the ids not started, and the output of failing processes."""
    begin, waiting = time.monotonic(), list(ids)
    running: dict[str, tuple[subprocess.Popen[str], float]] = {}
    record: dict[str, Any] = {"tests": len(ids), "not_run": [], "outputs": {}, "timed_out": []}
    while waiting or running:
        while waiting and len(running) < ISOLATED_PARALLEL and time.monotonic() - begin < limit:
            nodeid = waiting.pop(0)
            process = subprocess.Popen(
                [*command, nodeid], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace", start_new_session=True,
            )  # fmt: skip
            running[nodeid] = (process, time.monotonic())
        if waiting and time.monotonic() - begin >= limit:
            record["not_run"], waiting = waiting, []
        for nodeid, (process, started) in list(running.items()):
            late = time.monotonic() - started > ISOLATED_TEST_S or time.monotonic() - begin > limit + ISOLATED_TEST_S
            if process.poll() is None and not late:
                continue
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                record["timed_out"].append(nodeid)
            output = process.communicate()[0]
            if process.returncode != 0:
                record["outputs"][nodeid] = output[-4000:]
            del running[nodeid]
        time.sleep(0.2)
    record["wall_s"] = round(time.monotonic() - begin, 1)
    return record


def run_sanitizer(out: Path, limit: float, env: dict[str, str], smoke: bool) -> dict[str, Any]:
    """The kernels' test files under ``compute-sanitizer --tool memcheck`` (PATH or /usr/local/cuda/bin), within
    ``limit``; the verdict is its ERROR SUMMARY (``clean``, ``errors``, or ``timed out`` with the errors so far)."""
    tool = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer", path="/usr/local/cuda/bin")
    if tool is None or smoke:
        return {"status": "skipped", "reason": "CPU smoke run" if smoke else "compute-sanitizer not found"}
    files = [f"tests/test_{name}.py" for name in SANITIZED]
    command = [tool, "--tool", "memcheck", "--error-exitcode", "86", *pytest_command(out)[:5], "-v", "-x", *files]
    record = run_step("tests-sanitizer", command, limit, out, env)
    summaries = re.findall(r"ERROR SUMMARY: (\d+) error", (out / "tests-sanitizer.log").read_text(errors="replace"))
    record["memcheck_errors"] = sum(int(n) for n in summaries) if summaries else None
    record["verdict"] = "errors" if record["memcheck_errors"] else record["status"]
    record["verdict"] = "clean" if record["verdict"] == "ok" and summaries else record["verdict"]
    return record


def run_tests(
    command: list[str], paths: list[str], limit: float, out: Path, env: dict[str, str], smoke: bool
) -> dict[str, Any]:
    """The tests step (see the module doc): ``command`` is the main run's pytest command line, ending with
    ``paths`` (the test paths and selection options, which the isolated runs' collection uses too)."""
    begin = time.monotonic()
    log = out / "tests-outcomes.jsonl"
    log.unlink(missing_ok=True)
    isolated_command = [*pytest_command(out), "-q", "-m", "out_of_range"]
    ids = collect([*isolated_command, *paths], env, ISOLATED_S)
    isolated = run_isolated(isolated_command, list(ids), min(ISOLATED_S, limit / 3), env)
    record: dict[str, Any] = {"command": shlex.join(command), "limit_s": round(limit, 1), "log": "tests.log"}
    main_limit = limit - (time.monotonic() - begin) - (0 if smoke else SANITIZER_S)
    main = run_step("tests", command, main_limit, out, env)
    for _ in range(MAIN_ROUNDS - 1):  # a CUDA error stopped the run (pytest's code 2): go on in a fresh process
        done, left = read_outcomes(log), main_limit - main["wall_s"]
        cuda = [
            r for r in done.values() if r["outcome"] in ("failed", "error") and CUDA_ERROR.search(r.get("text", ""))
        ]
        if main["returncode"] != 2 or not cuda or left < 10:
            break
        options = [arg for arg in command[: -len(paths)] if not arg.startswith("--junitxml")]
        deselect = [f"--deselect={nodeid}" for nodeid in done]
        again = run_step("tests-resumed", [*options, *deselect, *paths], left, out, env)
        main = {**again, "wall_s": main["wall_s"] + again["wall_s"], "resumed": main.get("resumed", 0) + 1}
    record |= {
        key: main[key] for key in ("status", "returncode", "stdout_tail", "stderr_tail", "resumed") if key in main
    }
    record["sanitizer"] = run_sanitizer(out, max(5.0, limit - (time.monotonic() - begin)), env, smoke)
    outcomes = read_outcomes(log)
    for run_id in isolated["not_run"]:
        outcomes.setdefault(ids[run_id], {"nodeid": ids[run_id], "outcome": "not run"})
    for run_id, output in isolated["outputs"].items():
        nodeid = ids[run_id]
        if outcomes.get(nodeid, {}).get("outcome") in (None, "crashed"):  # the process died: its output says why
            outcomes[nodeid] = {"nodeid": nodeid, "outcome": "crashed", "text": output}
    record["counts"] = count_outcomes(outcomes) | {"not_run": len(isolated["not_run"])}
    record["junit"] = junit_counts(out / "tests.xml")
    record["isolated"] = {key: value for key, value in isolated.items() if key != "outputs"}
    bad = [r for r in outcomes.values() if r["outcome"] in ("failed", "error", "crashed")]
    (out / "tests-failures.txt").write_text(
        "".join(f"=== {r['nodeid']} ({r['outcome']})\n{r.get('text', '')}\n" for r in bad)
    )
    record["wall_s"] = round(time.monotonic() - begin, 1)
    return record
