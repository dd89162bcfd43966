#!/usr/bin/env bash
# The device window as one call (issues #37 and #38): #38's fault-proof test run, then #37's profile, end to end and
# GEMM table (bench.gpu_suite's default steps, 550 s of limits), and the 8 files that come back copied to $OUT.
# Here first: python scripts/gpu_carry.py (writes .carry/). Then one device call with carry [".carry"], timeout_s 600:
#     bash scripts/gpu_window.sh            (more bench.gpu_suite options may follow, e.g. --steps tests)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.carry/site:$PWD" PYTHONUNBUFFERED=1
export MP_SOURCE_COMMIT="${MP_SOURCE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('conditional graph nodes:', hasattr(torch.cuda.CUDAGraph, 'begin_capture_to_if_node'))"
tests_args=()  # pytest-xdist, carried by gpu_carry.py: the suite's Triton kernels compile on 12 cores at once
python -c "import xdist" 2>/dev/null && tests_args=(--tests-args "-n 12 --dist loadfile")
python -m bench.gpu_suite --out /tmp/suite "${tests_args[@]}" "$@"
status=$?
for name in summary.json tests.xml tests-outcomes.jsonl tests-failures.txt tests-sanitizer.log profile.json e2e.json \
    gemm_table.json; do
    [ -f "/tmp/suite/$name" ] && cp "/tmp/suite/$name" "${OUT:-/tmp}/"
done
exit $status
