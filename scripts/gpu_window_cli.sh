#!/usr/bin/env bash
# The second device window (#38 item 3): the command line on CUDA end to end on Rotten Tomatoes (mp train, mp
# reference, mp eval, mp predict), alone on the machine (a training loop is bound by Python and launches).
# Here first: python scripts/gpu_carry.py. Then one device call with carry [".carry"], timeout_s 600:
#     bash scripts/gpu_window_cli.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.carry/site:$PWD" PYTHONUNBUFFERED=1
export MP_SOURCE_COMMIT="${MP_SOURCE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
python -m bench.gpu_training --out /tmp/w --datasets rotten_tomatoes --budget 540 --train-args "--checkpoint-every 1000" "$@"
status=$?
for name in summary.json rotten_tomatoes-all-cuda.json rotten_tomatoes-all-predict-cuda.jsonl; do
    [ -f "/tmp/w/$name" ] && cp "/tmp/w/$name" "${OUT:-/tmp}/"
done
tar czf "${OUT:-/tmp}/logs.tgz" -C /tmp/w --exclude='*.jsonl' . 2>/dev/null
exit $status
