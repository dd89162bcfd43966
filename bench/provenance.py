"""Where the benchmarks write their results (``RESULTS_DIR``, a folder per kind of result), and the provenance
every results file records.

Provenance (device, driver, library versions, git commit, command, date) is ``mp_model.recipe.provenance``'s,
re-exported here for the benchmarks (``bench -> recipe``, never back).
"""

from __future__ import annotations

from pathlib import Path

from mp_model.recipe.provenance import device_name, provenance, write_results

__all__ = [
    "E2E_DIR",
    "KERNELS_DIR",
    "RESULTS_DIR",
    "SWEEPS_DIR",
    "device_name",
    "provenance",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The benchmarks' folders by kind (bench/results/README.md describes them all, evaluations/ and archive/ included).
E2E_DIR = RESULTS_DIR / "e2e"  # whole-model latency, bulk labelling, training steps, host work
KERNELS_DIR = RESULTS_DIR / "kernels"  # kernel microbenchmarks
SWEEPS_DIR = RESULTS_DIR / "sweeps"  # stage-4 sweeps
