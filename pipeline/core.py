"""The one moderation core: score -> route -> correct the flagged pairs -> re-inspect -> finish.

``moderate`` is written once, async, over two small protocols, and everything runs it:

- the batch job and the Ray Data engine through ``ModerationPipeline`` (a sync adapter: the
  loaded Inspector and Aligner behind ``InspectorScorer`` / ``SyncCorrector``, driven by ``run_sync``);
- the Ray Serve ingress through ``pipeline.flow.ModerationFlow`` (the Inspector and Aligner
  deployments behind async calls).

So per-pair failure isolation, re-inspection, the fallback policy, the typed reasons and the
timings (``inspector_ms``, ``aligner_ms``, ``reinspect_ms``, ``total_ms``) are the same everywhere:

- a pair the scorer fails on gets a result with ``error`` (its neighbours are decided as usual);
  the scorer failing as a whole (the inspector unavailable) is the caller's failure;
- the corrector failing (raising, or a failed result) gives the flagged pairs the fallback policy
  with a ``Reason``; it never loses a pair;
- the re-inspection failing keeps the correction, without a score (``on_error("reinspect")``);
  a correction still flagged gets the fallback policy (``reject_flagged_corrections``).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Coroutine, Protocol, Sequence, TypeVar


from aligner.results import ALIGNER_FAILURES, CorrectionResult, Reason

from .routing import (NO_ALIGNER, Moderation, PipelineConfig, RoutedAnswer, decide, finish, reinspect_targets,
                      reject_flagged_corrections, route)

T = TypeVar("T")


@dataclass
class PairScore:
    """One pair's score, or why the scorer could not score it."""

    score: float | None
    error: str | None = None


class Scorer(Protocol):
    async def score(self, queries: list[str], answers: list[str]) -> Sequence[float | PairScore]:
        """One score per pair, in order; a pair it cannot score is a ``PairScore`` with ``error``."""


class Corrector(Protocol):
    async def correct(self, queries: list[str], answers: list[str]) -> Sequence[CorrectionResult]:
        """One result per pair, in order; a failed one has ``ok=False`` and a ``reason``."""


#: ``on_error(stage, n)``: failures the core absorbs ("aligner": failed corrections, "reinspect")
OnError = Callable[[str, int], None]
ScoreFn = Callable[[list[str], list[str]], Awaitable[Sequence["float | PairScore"]]]
CorrectFn = Callable[[list[str], list[str]], Awaitable[Sequence[CorrectionResult]]]


def _scores(raw, n: int) -> tuple[list[float | None], dict[int, str]]:
    raw = list(raw)
    if len(raw) != n:
        raise RuntimeError(f"the scorer returned {len(raw)} scores for {n} pairs")
    scores: list[float | None] = []
    errors: dict[int, str] = {}
    for i, x in enumerate(raw):
        if isinstance(x, PairScore):
            if x.error is not None or x.score is None:
                errors[i] = x.error or "no score"
                scores.append(None)
                continue
            x = x.score
        scores.append(float(x))
    return scores, errors


async def correct_step(corrector: Corrector | None, queries: Sequence[str], answers: Sequence[str],
                       flagged: Sequence[bool], config: PipelineConfig,
                       on_error: OnError | None = None) -> list[RoutedAnswer]:
    """One ``RoutedAnswer`` per pair: only the flagged ones reach ``corrector`` (None: no aligner);
    each gets its correction or the fallback policy (``routing.decide``)."""
    if not len(queries) == len(answers) == len(flagged):
        raise ValueError(f"lengths differ: {len(queries)} queries, {len(answers)} answers, "
                         f"{len(flagged)} flags")
    idx = [i for i, f in enumerate(flagged) if f]
    results: dict[int, CorrectionResult] = {}
    missing = (Reason.NO_ALIGNER, NO_ALIGNER)
    if corrector is not None and idx:
        try:
            got = list(await corrector.correct([queries[i] for i in idx], [answers[i] for i in idx]))
            if len(got) != len(idx):
                raise RuntimeError(f"{len(got)} corrections for {len(idx)} flagged pairs")
            results = dict(zip(idx, got))
        except Exception as exc:  # noqa: BLE001 - the aligner failing must not lose the pairs
            missing = (Reason.ALIGNER_ERROR, f"aligner error: {type(exc).__name__}: {exc}"[:500])
        failed = len(idx) - len(results) + sum(r.reason in ALIGNER_FAILURES for r in results.values())
        if failed and on_error is not None:
            on_error("aligner", failed)
    return [decide(a, bool(f), results.get(i), config, missing)
            for i, (a, f) in enumerate(zip(answers, flagged))]


async def moderate(queries: Sequence[str], answers: Sequence[str], scorer: Scorer,
                   corrector: Corrector | None, config: PipelineConfig, threshold: float,
                   on_error: OnError | None = None,
                   known_scores: Sequence[float | PairScore] | None = None) -> list[Moderation]:
    """Moderate valid pairs: one ``Moderation`` per pair, in order (see the module docstring).

    ``known_scores``: the pairs' scores when the caller already has them (the streaming gate's
    check of the answer so far, ``pipeline.streaming``): the first scoring step is skipped, the
    rest (route, correct, re-inspect with ``scorer``, fallback) is the same."""
    queries, answers = list(queries), list(answers)
    t0 = time.perf_counter()
    raw = await scorer.score(queries, answers) if known_scores is None else known_scores
    scores, errors = _scores(raw, len(queries))
    t1 = time.perf_counter()
    flagged = [False] * len(queries)
    ok = [i for i in range(len(queries)) if i not in errors]
    for i, f in zip(ok, route([scores[i] for i in ok], threshold)):
        flagged[i] = bool(f)
    routed: list = await correct_step(corrector, queries, answers, flagged, config, on_error)
    for i in errors:
        routed[i] = None
    t2 = time.perf_counter()
    corrected_scores: dict[int, float] = {}
    redo = reinspect_targets(routed, config)
    if redo:
        try:
            again, bad = _scores(await scorer.score([queries[i] for i in redo], [routed[i].text for i in redo]),
                                 len(redo))
        except Exception:  # noqa: BLE001 - the corrections stand; only their scores are missing
            again, bad = [None] * len(redo), dict.fromkeys(range(len(redo)), "re-inspection failed")
        corrected_scores = {i: s for k, (i, s) in enumerate(zip(redo, again)) if k not in bad}
        if bad and on_error is not None:
            on_error("reinspect", 1)
        reject_flagged_corrections(answers, routed, corrected_scores, threshold, config)
    t3 = time.perf_counter()
    timings = {"inspector_ms": _ms(t1 - t0), "aligner_ms": _ms(t2 - t1), "reinspect_ms": _ms(t3 - t2),
               "total_ms": _ms(t3 - t0)}
    return finish(queries, answers, scores, routed, corrected_scores, timings, errors)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


# ----------------------------------------------------------------------------- adapters
@dataclass
class Calls:
    """A Scorer and a Corrector from plain async functions (the ingress's deployment calls)."""

    score_fn: ScoreFn | None = None
    correct_fn: CorrectFn | None = None

    async def score(self, queries, answers):
        return await self.score_fn(queries, answers)

    async def correct(self, queries, answers):
        return await self.correct_fn(queries, answers)


class InspectorScorer:
    """A loaded ``Inspector`` as a Scorer. Pairs are checked one by one (``check_pairs``) and the
    valid ones scored in one call; if the model still raises on one, each is scored alone, so one
    bad pair fails alone (a single pair's failure is the model's: it raises)."""

    def __init__(self, inspector):
        self.inspector = inspector

    def score_pairs(self, queries: Sequence, answers: Sequence) -> list[PairScore]:
        from inspector import check_pairs

        out: list[PairScore | None] = [None] * len(queries)
        ok = []
        for i, (q, a) in enumerate(zip(queries, answers)):
            try:
                check_pairs([q], [a])
                ok.append(i)
            except (TypeError, ValueError) as exc:
                out[i] = PairScore(None, str(exc).replace("pair 0: ", ""))
        if ok:
            try:
                scores = list(self.inspector.score([queries[i] for i in ok], [answers[i] for i in ok]))
            except Exception:  # noqa: BLE001 - a pair the checks missed must not fail the others
                if len(ok) == 1:
                    raise
                scores = [self._score_alone(queries[i], answers[i]) for i in ok]
            for i, s in zip(ok, scores):
                out[i] = s if isinstance(s, PairScore) else PairScore(float(s))
        return out  # type: ignore[return-value]

    def _score_alone(self, query: str, answer: str) -> float | PairScore:
        try:
            return float(self.inspector.score([query], [answer])[0])
        except Exception as exc:  # noqa: BLE001
            return PairScore(None, f"the inspector failed on this pair: {type(exc).__name__}: {exc}"[:500])

    async def score(self, queries, answers):
        return self.score_pairs(queries, answers)


class SyncCorrector:
    """An in-process aligner (anything with ``correct_detailed``) as a Corrector."""

    def __init__(self, aligner, generation: dict | None = None):
        self.aligner, self.generation = aligner, dict(generation or {})

    async def correct(self, queries, answers):
        return self.aligner.correct_detailed(list(queries), list(answers), **self.generation)


def run_sync(coro: Coroutine[object, object, T]) -> T:
    """Run a coroutine to its end from sync code; inside a running event loop (a notebook) it
    runs on a worker thread's own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def correct_flagged(aligner, queries: Sequence[str], answers: Sequence[str], flagged: Sequence[bool],
                    policy: str = "fail_open", refusal: str | None = None, **generation) -> list[RoutedAnswer]:
    """The correction step alone, sync: one ``RoutedAnswer`` per row; ``aligner`` may be None."""
    config = PipelineConfig(fallback=policy, **({"refusal_text": refusal} if refusal is not None else {}))
    corrector = SyncCorrector(aligner, generation) if aligner is not None else None
    return run_sync(correct_step(corrector, list(queries), list(answers), list(flagged), config))


class ModerationPipeline:
    """Inspector + optional aligner in one process (batch job, Ray Data actors, notebooks, tests):
    the core, run synchronously."""

    def __init__(self, inspector, aligner=None, config: PipelineConfig | None = None):
        self.inspector = inspector
        self.aligner = aligner
        self.config = config or PipelineConfig()

    @property
    def threshold(self) -> float:
        t = self.config.threshold
        return float(self.inspector.threshold if t is None else t)

    def moderate(self, queries: Sequence[str], answers: Sequence[str]) -> list[Moderation]:
        """Moderate a batch of pairs (see ``inspector.check_pairs`` for what is valid)."""
        corrector = SyncCorrector(self.aligner, self.config.generation_kwargs()) if self.aligner is not None else None
        return run_sync(moderate(queries, answers, InspectorScorer(self.inspector), corrector, self.config,
                                 self.threshold))
