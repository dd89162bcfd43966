"""``mp serve``'s counters, gauges and histograms, shown in the Prometheus text format on ``/metrics``.

One ``ServeMetrics`` per server, updated from the event loop (requests) and from the worker thread (batches) under
one lock. Names start with ``mp_``: requests by status, requests in flight and texts waiting, each batch's texts
and padded tokens, texts' exit layers and kept tokens (with their means since start), and latency histograms of
whole requests, of the wait in the queue and of the model's passes.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Histogram:
    """A Prometheus histogram: cumulative counts at upper bounds ``buckets`` (and ``+Inf``), a sum and a count."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= ``value``."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self) -> list[str]:
        """The histogram's lines in the text format."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts, strict=True):
            total += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return [*out, f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {total}"]


class ServeMetrics:
    """The server's metrics (see the module's docstring); every method is thread-safe."""

    def __init__(self, layers: int) -> None:
        self._lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.in_flight = 0
        self.queued = 0
        self.texts = self.exit_layers = self.tokens = self.kept = 0
        self.batch_texts = Histogram("mp_batch_texts", "Texts in each model pass.", SIZE_BUCKETS)
        self.batch_tokens = Histogram("mp_batch_tokens", "Padded tokens (texts x longest) in each pass.", SIZE_BUCKETS)
        self.exit_layer = Histogram("mp_exit_layer", "Layers each text ran before it exited.", range(1, layers + 1))
        self.request_seconds = Histogram(
            "mp_request_duration_seconds", "Time from a request's arrival to its answer.", LATENCY_BUCKETS
        )
        self.queue_seconds = Histogram("mp_queue_duration_seconds", "Time texts waited for a batch.", LATENCY_BUCKETS)
        self.inference_seconds = Histogram(
            "mp_inference_duration_seconds", "Time of each model pass (a batch).", LATENCY_BUCKETS
        )

    def answered(self, status: int, seconds: float | None) -> None:
        """Count one answer with ``status``; ``seconds``: its latency, for accepted requests."""
        with self._lock:
            self.statuses[status] += 1
            if seconds is not None:
                self.request_seconds.observe(seconds)

    def add_in_flight(self, change: int) -> None:
        """Requests accepted and not yet answered change by ``change``."""
        with self._lock:
            self.in_flight += change

    def add_queued(self, change: int) -> None:
        """Texts waiting for a batch change by ``change``."""
        with self._lock:
            self.queued += change

    def batch(self, texts: int, padded_tokens: int, seconds: float, waits: Sequence[float]) -> None:
        """One model pass over ``texts`` texts and ``padded_tokens`` tokens that took ``seconds``; ``waits``: how
        long each of its texts waited in the queue."""
        with self._lock:
            self.batch_texts.observe(texts)
            self.batch_tokens.observe(padded_tokens)
            self.inference_seconds.observe(seconds)
            for wait in waits:
                self.queue_seconds.observe(wait)

    def text(self, exit_layer: int, tokens: int, kept: int) -> None:
        """One text classified: it ran ``exit_layer`` layers over ``tokens`` tokens (its length x layers) and kept
        ``kept`` of them."""
        with self._lock:
            self.exit_layer.observe(exit_layer)
            self.texts += 1
            self.exit_layers += exit_layer
            self.tokens += tokens
            self.kept += kept

    def snapshot(self) -> dict[str, float]:
        """Requests in flight, texts queued, texts classified and answers by status (``status_200``...)."""
        with self._lock:
            plain = {"in_flight": self.in_flight, "queued": self.queued, "texts": self.texts}
            return plain | {f"status_{code}": count for code, count in self.statuses.items()}

    def render(self) -> str:
        """Every metric in the Prometheus text format (version 0.0.4)."""
        with self._lock:
            lines = ["# HELP mp_requests_total Answered requests by HTTP status.", "# TYPE mp_requests_total counter"]
            lines += [f'mp_requests_total{{status="{code}"}} {n}' for code, n in sorted(self.statuses.items())]
            gauges = {
                "mp_requests_in_flight": ("Requests accepted and not yet answered.", self.in_flight),
                "mp_queue_depth": ("Texts waiting for a batch.", self.queued),
                "mp_mean_exit_layer": (
                    "Mean exit layer of the texts since start.",
                    self.exit_layers / max(self.texts, 1),
                ),
                "mp_kept_token_share": (
                    "Share of tokens kept over the layers run, since start.",
                    self.kept / max(self.tokens, 1),
                ),
            }
            for name, (help_text, value) in gauges.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
            counters = {
                "mp_texts_total": ("Texts classified.", self.texts),
                "mp_tokens_total": ("Tokens times the layers they ran.", self.tokens),
                "mp_kept_tokens_total": ("Tokens kept after each layer's pruning, over the layers run.", self.kept),
            }
            for name, (help_text, value) in counters.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            for histogram in (self.batch_texts, self.batch_tokens, self.exit_layer):
                lines += histogram.lines()
            for histogram in (self.request_seconds, self.queue_seconds, self.inference_seconds):
                lines += histogram.lines()
            return "\n".join(lines) + "\n"
