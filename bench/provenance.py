"""Where the benchmarks write their results (``RESULTS_DIR``), and the provenance every results file records.

Provenance (device, driver, library versions, git commit, command, date) is ``mp_model.recipe.provenance``'s,
re-exported here for the benchmarks (``bench -> recipe``, never back).
"""

from __future__ import annotations

from pathlib import Path

from mp_model.recipe.provenance import device_name, provenance, write_results

__all__ = ["RESULTS_DIR", "device_name", "provenance", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
