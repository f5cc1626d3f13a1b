"""The one place where the pipeline decides: score every pair, compare to the threshold, send
only flagged pairs to the aligner, re-inspect each correction, apply the fallback policy.

Re-inspection counts: a correction the inspector still flags (its score reaches the threshold) is
not shown; that pair gets the fallback policy like a failed correction (fail_open: the original
answer, flagged; fail_closed: the refusal text), with ``problem`` saying why
(``reject_flagged_corrections``).

The batch job (``pipeline.batch``), the Ray Data engine and the Ray Serve ingress all call
``route`` and ``ModerationPipeline.moderate`` (or, when inspector and aligner live in separate
deployments, ``route`` + ``aligner.correct_flagged`` + ``finish``), so a threshold or policy means
the same thing everywhere.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from aligner.fallback import DEFAULT_REFUSAL, apply_fallback, check_policy

#: ``Moderation.problem`` of a pair whose correction the inspector still flagged on re-inspection
STILL_FLAGGED = "correction still flagged on re-inspection"


@dataclass
class PipelineConfig:
    """What a deployment chooses; ``threshold=None`` means the inspector's stored threshold."""

    threshold: float | None = None
    fallback: str = "fail_open"
    refusal_text: str = DEFAULT_REFUSAL
    reinspect: bool = True
    max_new_tokens: int | None = None

    def __post_init__(self):
        check_policy(self.fallback)
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {self.threshold}")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError("refusal_text must be a non-empty string: fail_closed shows it instead of a "
                             f"flagged answer; got {self.refusal_text!r}")


@dataclass
class Moderation:
    """The outcome for one pair."""

    score: float
    flagged: bool
    answer: str                      # the text to show the user
    original_answer: str
    corrected: bool                  # True when ``answer`` is the aligner's correction
    corrected_answer: str | None     # aligner output or refusal text; None when untouched
    corrected_score: float | None    # the inspector's score of ``corrected_answer``
    fallback: str | None             # the policy applied, if any
    problem: str | None = None       # why the aligner's output was not used
    timings_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def route(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The routing decision: a pair goes to the aligner iff its score reaches the threshold."""
    return np.asarray(scores, dtype=float) >= float(threshold)


def finish(queries: Sequence[str], answers: Sequence[str], scores: np.ndarray, flagged: np.ndarray,
           routed: list, corrected_scores: dict[int, float], timings_ms: dict | None = None
           ) -> list[Moderation]:
    """Assemble per-pair results from the routing, the aligner's answers and the re-inspection."""
    out = []
    for i, (a, s, f, r) in enumerate(zip(answers, scores, flagged, routed)):
        changed = bool(f) and r.text != a
        out.append(Moderation(
            score=float(s), flagged=bool(f), answer=r.text, original_answer=a,
            corrected=bool(r.corrected), corrected_answer=r.text if changed else None,
            corrected_score=corrected_scores.get(i), fallback=r.fallback_used, problem=r.problem,
            timings_ms=dict(timings_ms or {})))
    return out


def resolve_flagged(aligner, queries: Sequence[str], answers: Sequence[str], flagged: np.ndarray,
                    config: PipelineConfig) -> list:
    """Corrections for the flagged rows (``aligner.correct_flagged``) with the configured fallback
    and refusal text. ``aligner`` is anything with ``correct_detailed`` (the Serve ingress passes
    the results its aligner deployment returned), or None."""
    from aligner.routing import correct_flagged

    gen = {"max_new_tokens": config.max_new_tokens} if config.max_new_tokens else {}
    return correct_flagged(aligner, list(queries), list(answers), flagged, policy=config.fallback,
                           refusal=config.refusal_text, **gen)


def reinspect_targets(routed: list, config: PipelineConfig) -> list[int]:
    """Rows whose correction the inspector scores again (none when ``reinspect`` is off)."""
    if not config.reinspect:
        return []
    return [i for i, r in enumerate(routed) if r.flagged and r.corrected]


def reject_flagged_corrections(answers: Sequence[str], routed: list, corrected_scores: dict[int, float],
                               threshold: float, config: PipelineConfig) -> None:
    """Re-inspection counts: each correction whose score still reaches ``threshold`` is replaced,
    in place, by the fallback policy's answer (the same ``apply_fallback`` as a failed correction),
    and its score leaves ``corrected_scores`` (it scored a text that is no longer shown; the score
    is in ``problem``)."""
    from aligner.routing import RoutedAnswer

    for i in sorted(corrected_scores):
        score = corrected_scores[i]
        if not bool(route([score], threshold)[0]):
            continue
        text, used = apply_fallback(answers[i], None, config.fallback, config.refusal_text)
        routed[i] = RoutedAnswer(text, True, False, used,
                                 f"{STILL_FLAGGED} (score {score:.3f} >= threshold {float(threshold):.3f})")
        del corrected_scores[i]


class ModerationPipeline:
    """Inspector + optional aligner in one process (batch job, notebooks, tests)."""

    def __init__(self, inspector, aligner=None, config: PipelineConfig | None = None):
        self.inspector = inspector
        self.aligner = aligner
        self.config = config or PipelineConfig()

    @property
    def threshold(self) -> float:
        t = self.config.threshold
        return float(self.inspector.threshold if t is None else t)

    def moderate(self, queries: Sequence[str], answers: Sequence[str]) -> list[Moderation]:
        """Moderate a batch of valid pairs (see ``inspector.check_pairs`` for what is valid)."""
        t0 = time.perf_counter()
        scores = self.inspector.score(queries, answers)
        t1 = time.perf_counter()
        flagged = route(scores, self.threshold)
        routed = resolve_flagged(self.aligner, queries, answers, flagged, self.config)
        t2 = time.perf_counter()
        corrected_scores: dict[int, float] = {}
        redo = reinspect_targets(routed, self.config)
        if redo:
            again = self.inspector.score([queries[i] for i in redo], [routed[i].text for i in redo])
            corrected_scores = {i: float(s) for i, s in zip(redo, again)}
            reject_flagged_corrections(answers, routed, corrected_scores, self.threshold, self.config)
        t3 = time.perf_counter()
        timings = {"inspector_ms": round((t1 - t0) * 1e3, 2), "aligner_ms": round((t2 - t1) * 1e3, 2),
                   "reinspect_ms": round((t3 - t2) * 1e3, 2)}
        return finish(queries, answers, scores, flagged, routed, corrected_scores, timings)
