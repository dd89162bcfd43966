"""Wall-clock timing for benchmarks: ``mp_model.recipe.timing.median_ms`` (warm-up, then the median of many
repeats, on CPU or CUDA), the application's one timer, re-exported here (``bench -> recipe``, never back)."""

from __future__ import annotations

from mp_model.recipe.timing import median_ms

__all__ = ["median_ms"]
