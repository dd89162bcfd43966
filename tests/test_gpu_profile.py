"""The GPU profile's split: launches, busy and idle time per forward, kernels ranked by time."""

from __future__ import annotations

import json

import pytest

from bench.gpu_profile import TOP_KERNELS, kernel_split, main


def test_busy_time_is_the_union_of_kernel_intervals_and_idle_the_rest_of_the_wall_time() -> None:
    intervals = [("gemm", 0.0, 10.0), ("norm", 5.0, 12.0), ("gemm", 20.0, 30.0), ("exit", 40.0, 41.0)]
    split = kernel_split(intervals, forwards=2, wall_us=100.0)
    assert split["kernels"] == 2.0
    assert split["busy_us"] == pytest.approx((12.0 + 10.0 + 1.0) / 2)
    assert split["sum_us"] == pytest.approx((10.0 + 7.0 + 10.0 + 1.0) / 2)
    assert split["idle_us"] == pytest.approx(50.0 - 11.5)
    assert [row["name"] for row in split["by_name"]] == ["gemm", "norm", "exit"]
    gemm = split["by_name"][0]
    assert gemm["count"] == 1.0 and gemm["us"] == 10.0 and gemm["share"] == pytest.approx(20.0 / 28.0)


def test_kernels_past_the_top_are_summed_as_other() -> None:
    intervals = [(f"k{i}", float(i), float(i) + 1.0 + i / 100) for i in range(TOP_KERNELS + 3)]
    rows = kernel_split(intervals, forwards=1, wall_us=1000.0)["by_name"]
    assert len(rows) == TOP_KERNELS + 1 and rows[-1]["name"] == "(other)" and rows[-1]["count"] == 3
    assert sum(row["share"] for row in rows) == pytest.approx(1.0)


def test_no_forwards_is_refused() -> None:
    with pytest.raises(ValueError, match="forwards"):
        kernel_split([], forwards=0, wall_us=1.0)


@pytest.mark.slow
def test_smoke_run_writes_one_record_per_cell_with_provenance(tmp_path) -> None:
    out = tmp_path / "profile.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["provenance"]["benchmark"] == "gpu_profile"
    (record,) = document["records"]
    assert record["method"] == "graph_mp" and record["forwards"] == 2 and "error" not in record
