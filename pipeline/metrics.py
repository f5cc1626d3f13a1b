"""What the ingress counts and remembers: ``PipelineMetrics`` (Ray Serve metrics, published for
Prometheus as ``ray_moderation_*``, and in-process totals) and ``RecentOutcomes`` (the
inspector's recent calls, for ``/healthz``)."""
from __future__ import annotations

import time
from collections import Counter as _Tally
from typing import Any, Callable, Sequence

from aligner.results import Reason

from .routing import Moderation

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
HOLDBACK_BOUNDARIES_CHARS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class PipelineMetrics:
    """What the ingress counts. Totals are kept in-process (``totals``) and, with ``export``,
    recorded as Ray Serve metrics, which Ray publishes for Prometheus as ``ray_moderation_*``
    (the deployment, replica and application tags are added by Serve).

    ``moderation_flagged_total / moderation_pairs_total`` is the share of answers that paid the
    aligner's cost: the alignment tax actually paid. ``moderation_flagged_share`` is that ratio
    since the replica started."""

    def __init__(self, export: bool = True):
        self.totals: _Tally = _Tally()
        self._m: dict[str, Any] = {}
        if export:
            from ray.serve.metrics import Counter, Gauge, Histogram

            c = lambda name, desc, tags: Counter(name, description=desc, tag_keys=tags)  # noqa: E731
            h = lambda name, desc, tags: Histogram(  # noqa: E731
                name, description=desc, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)
            self._m = {
                "requests": c("moderation_requests_total", "HTTP requests by endpoint and status code",
                              ("endpoint", "status")),
                "pairs": c("moderation_pairs_total", "(query, answer) pairs scored", ("endpoint",)),
                "flagged": c("moderation_flagged_total", "pairs the inspector routed to the aligner",
                             ("endpoint",)),
                "corrected": c("moderation_corrected_total", "pairs answered with the aligner's correction",
                               ("endpoint",)),
                "fallbacks": c("moderation_fallbacks_total", "flagged pairs answered by the fallback policy",
                               ("endpoint", "policy", "reason")),
                "errors": c("moderation_errors_total", "failures by stage", ("stage",)),
                "share": Gauge("moderation_flagged_share", description="flagged / scored pairs since start",
                               tag_keys=("endpoint",)),
                "request_ms": h("moderation_request_latency_ms", "ingress latency per request", ("endpoint",)),
                "inspector_ms": h("moderation_inspector_latency_ms", "inspector step latency per request", ()),
                "aligner_ms": h("moderation_aligner_latency_ms", "aligner step latency per request with "
                                "flagged pairs", ()),
                "upstream_ms": h("moderation_upstream_latency_ms", "upstream chatbot latency", ()),
                "stream_ttft_ms": h("moderation_stream_ttft_ms", "streamed requests: request start to the "
                                    "first released text", ()),
                "stream_holdback_ms": h("moderation_stream_holdback_ms", "streamed requests: the longest "
                                        "any text waited for its check, per request", ()),
                "stream_holdback_chars": Histogram("moderation_stream_holdback_chars", description=(
                    "streamed requests: the most unreleased text one check covered, per request"),
                    boundaries=HOLDBACK_BOUNDARIES_CHARS, tag_keys=()),
                "stream_checks": c("moderation_stream_checks_total", "inspector checks of streamed answers", ()),
                "stream_flags": c("moderation_stream_flags_total", "streamed answers cut by a flag: during "
                                  "the upstream's stream or at its end", ("when",)),
            }

    def _inc(self, key: str, n: float = 1, **tags) -> None:
        self.totals[(key, *sorted(tags.items()))] += n
        self.totals[key] += n
        if key in self._m and n:
            self._m[key].inc(n, tags={k: str(v) for k, v in tags.items()} or None)

    def _observe(self, key: str, value: float, **tags) -> None:
        if key in self._m:
            self._m[key].observe(value, tags={k: str(v) for k, v in tags.items()} or None)

    def request(self, endpoint: str, status: int, latency_ms: float) -> None:
        self._inc("requests", endpoint=endpoint, status=status)
        self._observe("request_ms", latency_ms, endpoint=endpoint)

    def outcomes(self, endpoint: str, results: Sequence[Moderation], policy: str) -> None:
        flagged = sum(r.flagged for r in results if r.error is None)
        self._inc("pairs", sum(r.error is None for r in results), endpoint=endpoint)
        self._inc("flagged", flagged, endpoint=endpoint)
        self._inc("corrected", sum(r.corrected for r in results), endpoint=endpoint)
        results = [r for r in results if r.error is None]
        for r in results:
            if r.fallback:
                reason = (r.reason or Reason.UNUSABLE).value
                self._inc("fallbacks", 1, endpoint=endpoint, policy=r.fallback, reason=reason)
        pairs = self.totals[("pairs", ("endpoint", endpoint))]
        if pairs and "share" in self._m:
            self._m["share"].set(self.totals[("flagged", ("endpoint", endpoint))] / pairs,
                                 tags={"endpoint": endpoint})

    def error(self, stage: str, n: int = 1) -> None:
        self._inc("errors", n, stage=stage)

    def latency(self, step: str, ms: float) -> None:
        self._observe(f"{step}_ms", ms)

    def stream(self, ttft_ms: float | None, holdback_ms: float, holdback_chars: int, checks: int) -> None:
        """One streamed request's figures, when it ends (an error event included)."""
        self._inc("stream_checks", checks)
        self._inc("streams")
        if ttft_ms is not None:
            self._observe("stream_ttft_ms", ttft_ms)
        if checks:
            self._observe("stream_holdback_ms", holdback_ms)
            self._observe("stream_holdback_chars", holdback_chars)

    def stream_flag(self, when: str) -> None:
        """A check flagged a streamed answer: ``when`` "during" the upstream's stream or at its "end"."""
        self._inc("stream_flags", when=when)


class RecentOutcomes:
    """The inspector's recent calls (the last ``window_s``), for ``/healthz``: ``verdict`` is
    why the inspector is not answering (None when it is): at least ``min_calls`` calls of which
    ``max_failure_share`` or more failed (timed out, unavailable)."""

    def __init__(self, window_s: float = 30.0, min_calls: int = 5, max_failure_share: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s, self.min_calls, self.max_share, self.clock = window_s, min_calls, max_failure_share, clock
        self._events: list[tuple[float, bool, str | None]] = []

    def record(self, ok: bool, detail: str | None = None) -> None:
        self._events.append((self.clock(), ok, detail))
        self._trim()

    def _trim(self) -> None:
        cut = self.clock() - self.window_s
        k = 0
        while k < len(self._events) and self._events[k][0] < cut:
            k += 1
        if k:
            del self._events[:k]
        if len(self._events) > 10000:
            del self._events[:-10000]

    def summary(self) -> dict:
        self._trim()
        failed = [e for e in self._events if not e[1]]
        return {"window_s": self.window_s, "calls": len(self._events), "failures": len(failed),
                "last_failure": failed[-1][2] if failed else None}

    def verdict(self) -> str | None:
        s = self.summary()
        if s["calls"] >= self.min_calls and s["failures"] >= self.max_share * s["calls"]:
            return (f"the inspector failed {s['failures']} of its last {s['calls']} calls "
                    f"(in {self.window_s:g} s); last: {s['last_failure']}")
        return None
