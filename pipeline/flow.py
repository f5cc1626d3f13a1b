"""One request's decision in the Serve ingress: ``pipeline.core.moderate`` (what the batch job
runs) with the Inspector and Aligner deployments behind async calls, plus the metrics."""
from __future__ import annotations

import time
from typing import Awaitable, Callable, Sequence

from aligner.results import CorrectionResult

from .core import Calls, PairScore, moderate
from .http import StageError
from .metrics import PipelineMetrics
from .routing import Moderation
from .settings import ServeSettings

ScoreFn = Callable[[list[str], list[str]], Awaitable[Sequence["float | PairScore"]]]
CorrectFn = Callable[[list[str], list[str]], Awaitable[list[CorrectionResult]]]


class ModerationFlow:
    """One request's decision: ``pipeline.core.moderate`` (what the batch job runs) with the
    inspector and aligner behind async calls, plus the metrics. The scorer failing as a whole
    (``StageError``) is the request's failure; everything else is decided per pair."""

    def __init__(self, settings: ServeSettings, score: ScoreFn, correct: CorrectFn | None,
                 threshold: Callable[[], Awaitable[float]], metrics: PipelineMetrics | None = None):
        self.settings = settings
        self.config = settings.pipeline_config()
        self._scorer = Calls(score_fn=score)
        self._corrector = Calls(correct_fn=correct) if correct is not None else None
        self._threshold = threshold
        self.metrics = metrics or PipelineMetrics(export=False)

    async def threshold(self) -> float:
        return await self._threshold()

    async def check(self, query: str, answer: str) -> float:
        """One streaming check (``pipeline.streaming``): the inspector's score of (query, answer so
        far). ``StageError`` when it cannot score: 503 as a whole, 422 for this pair."""
        t = time.perf_counter()
        try:
            raw = list(await self._scorer.score([query], [answer]))
        except StageError:
            self.metrics.error("inspector")
            raise
        self.metrics.latency("inspector", (time.perf_counter() - t) * 1e3)
        x = raw[0] if len(raw) == 1 else PairScore(None, f"the scorer returned {len(raw)} scores for 1 pair")
        if isinstance(x, PairScore):
            if x.error is not None or x.score is None:
                self.metrics.error("score_pair")
                raise StageError("inspector", f"the answer so far could not be scored: {x.error or 'no score'}",
                                 status=422)
            x = x.score
        return float(x)

    async def moderate(self, queries: list[str], answers: list[str], endpoint: str = "moderate",
                       known_scores: Sequence[float] | None = None) -> list[Moderation]:
        """``known_scores``: the pairs were scored already (a streaming check): skip that step."""
        try:
            threshold = await self._threshold()
            out = await moderate(queries, answers, self._scorer, self._corrector, self.config, threshold,
                                 on_error=self.metrics.error, known_scores=known_scores)
        except StageError:
            self.metrics.error("inspector")
            raise
        if out:
            t = out[0].timings_ms
            if known_scores is None:
                self.metrics.latency("inspector", t["inspector_ms"])
            if self._corrector is not None and any(o.flagged for o in out):
                self.metrics.latency("aligner", t["aligner_ms"])
        bad = sum(o.error is not None for o in out)
        if bad:
            self.metrics.error("score_pair", bad)
        self.metrics.outcomes(endpoint, out, self.config.fallback)
        return out
