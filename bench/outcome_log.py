"""pytest plugin: one JSON line per test, appended to a file and flushed as it happens, so that a kill loses nothing.

    python -m pytest -p bench.outcome_log --outcome-log OUT/tests-outcomes.jsonl tests

Each test writes a ``{"nodeid", "outcome": "started"}`` line when it starts and, when it ends, a line with its
``outcome`` (``passed``, ``failed``, ``error`` for a failing set-up or tear-down, ``skipped``, ``xfailed`` or
``xpassed``), ``duration`` (seconds, all phases) and, unless it passed, ``text``: the failure or skip reason cut to
its last ``TEXT_CHARS`` characters. A test left at ``started`` was running when its process died or was killed.
With ``--collect-only`` it lists the collected tests instead (``collected``, with a ``run_id`` that runs the test
from any folder).

With ``--stop-on-cuda-error`` the session stops after the first test whose failure is a CUDA error (a sticky one,
such as an illegal memory access, fails every later CUDA call of the process): ``bench.gpu_suite`` then starts a
fresh process for the tests not yet run. ``read_outcomes`` and ``count_outcomes`` read a log back (this module
imports nothing beyond the standard library and pytest, so that loading it costs a test session nothing).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import IO, Any

import pytest

TEXT_CHARS = 4000
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "crashed")
CUDA_ERROR = re.compile(
    r"CUDA error|illegal memory access|misaligned address|unspecified launch failure|AcceleratorError"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("outcome log")
    group.addoption("--outcome-log", default=None, help="append one JSON line per test to this file")
    group.addoption(
        "--stop-on-cuda-error", action="store_true", help="stop the session after a test fails with a CUDA error"
    )


class OutcomeLog:
    """The per-test records of one session, each written and flushed at once."""

    def __init__(self, file: IO[str], stop_on_cuda_error: bool) -> None:
        self.file, self.stop_on_cuda_error = file, stop_on_cuda_error
        self.tests: dict[str, dict[str, Any]] = {}
        self.session: pytest.Session | None = None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """With ``--collect-only``: one ``collected`` line per test, with its ``run_id`` (absolute file path)."""
        if session.config.option.collectonly:
            for item in session.items:
                run_id = f"{item.path}::{item.nodeid.split('::', 1)[1]}"
                self.write({"nodeid": item.nodeid, "outcome": "collected", "run_id": run_id})

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self.tests[nodeid] = {"nodeid": nodeid, "outcome": "passed", "duration": 0.0, "begin": time.time()}
        self.write({"nodeid": nodeid, "outcome": "started"})

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "duration": 0.0})
        record["duration"] += report.duration
        outcome = phase_outcome(report)
        if outcome != "passed" and record["outcome"] in ("passed", "xpassed"):
            record["outcome"] = outcome
            record["text"] = report_text(report)
        elif outcome == "xpassed" and record["outcome"] == "passed":
            record["outcome"] = "xpassed"

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        record = self.tests.pop(nodeid)
        record.pop("begin", None)
        record["duration"] = round(record["duration"], 3)
        self.write(record)
        failed = record["outcome"] in ("failed", "error")
        if failed and self.stop_on_cuda_error and self.session and CUDA_ERROR.search(record.get("text", "")):
            self.session.shouldstop = f"CUDA error in {nodeid}: the process's later CUDA calls would fail"


def phase_outcome(report: pytest.TestReport) -> str:
    """The outcome one phase (set-up, call, tear-down) of a test gives it."""
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    return "skipped" if report.skipped else "passed"


def report_text(report: pytest.TestReport) -> str:
    """The failure text or skip reason of a report, cut to its last ``TEXT_CHARS`` characters."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = report.longreprtext or getattr(report, "wasxfail", "")
    return text[-TEXT_CHARS:]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--outcome-log")
    if path is None or hasattr(config, "workerinput"):  # an xdist worker reports to its controller
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the whole session, closed in unconfigure)
    plugin = OutcomeLog(file, config.getoption("--stop-on-cuda-error"))
    config.pluginmanager.register(plugin, "outcome-log")
    config.stash[LOG_KEY] = plugin


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(LOG_KEY, None)
    if plugin is not None:
        plugin.file.close()


LOG_KEY = pytest.StashKey[OutcomeLog]()


def read_outcomes(path: Path) -> dict[str, dict[str, Any]]:
    """Each test's last record in a log (in first-seen order); a test whose last record is ``started`` becomes
    ``crashed`` (its process died or was killed while it ran). Unreadable lines (a torn last write) are skipped."""
    records: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["nodeid"]] = record
    for record in records.values():
        if record["outcome"] == "started":
            record["outcome"] = "crashed"
    return records


def count_outcomes(records: dict[str, dict[str, Any]], names: int = 60) -> dict[str, Any]:
    """Counts per outcome (``errors`` for set-up or tear-down failures, ``crashed`` counted with them) and the
    first ``names`` failing tests by name (failed, error, crashed, xpassed from strict marks show as failed)."""
    tally = {outcome: 0 for outcome in OUTCOMES}
    for record in records.values():
        tally[record["outcome"]] = tally.get(record["outcome"], 0) + 1
    bad = [nodeid for nodeid, r in records.items() if r["outcome"] in ("failed", "error", "crashed")]
    counts = {"passed": tally["passed"], "failed": tally["failed"], "errors": tally["error"] + tally["crashed"]}
    counts |= {"skipped": tally["skipped"], "xfailed": tally["xfailed"], "xpassed": tally["xpassed"]}
    return counts | {"crashed": tally["crashed"], "failed_tests": bad[:names]}
