"""The routing decision: which pairs go to the aligner, what a flagged pair shows, and the
fallback policy. Pure functions and plain types (no model, no torch); ``pipeline.core`` runs them
in order (score -> ``route`` -> correct -> ``decide`` -> re-inspect -> ``reject_flagged_corrections``
-> ``finish``) for the batch job, the Ray Data engine and the Ray Serve ingress alike.

Re-inspection counts: a correction the inspector still flags (its score reaches the threshold) is
not shown; that pair gets the fallback policy like a failed correction (fail_open: the original
answer, flagged; fail_closed: the refusal text), with ``reason`` ``Reason.STILL_FLAGGED`` and
``problem`` saying why in words.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from aligner.results import CorrectionResult, Reason

FALLBACK_POLICIES = ("fail_open", "fail_closed")

#: The safe refusal that ``fail_closed`` shows instead of a flagged answer.
DEFAULT_REFUSAL = (
    "I'm sorry, but I can't help with that. If you are dealing with a difficult situation, "
    "please consider reaching out to someone you trust or to a qualified professional."
)

#: ``Moderation.problem`` of a pair whose correction the inspector still flagged on re-inspection
STILL_FLAGGED = "correction still flagged on re-inspection"
NO_ALIGNER = "no aligner configured"


def check_policy(policy: str) -> str:
    if policy not in FALLBACK_POLICIES:
        raise ValueError(f"fallback policy must be one of {FALLBACK_POLICIES}, got {policy!r}")
    return policy


def apply_fallback(original_answer: str, result: CorrectionResult | None, policy: str,
                   refusal: str = DEFAULT_REFUSAL) -> tuple[str, str | None]:
    """Return ``(final_text, fallback_used)`` for one flagged answer.

    ``result`` is None when no aligner is configured, it failed or timed out; a result with
    ``ok=False`` (empty or degenerate output) is treated the same. ``fallback_used`` is None when
    the correction itself is used, else the policy name, so the output shows what happened.
    """
    check_policy(policy)
    if result is not None and result.ok and result.text.strip():
        return result.text, None
    if policy == "fail_open":
        return original_answer, "fail_open"
    return refusal, "fail_closed"


@dataclass
class PipelineConfig:
    """What a deployment chooses; ``threshold=None`` means the inspector's stored threshold."""

    threshold: float | None = None
    fallback: str = "fail_open"
    refusal_text: str = DEFAULT_REFUSAL
    reinspect: bool = True
    max_new_tokens: int | None = None
    generation: dict = field(default_factory=dict)  # extra generate() kwargs for an in-process aligner

    def __post_init__(self):
        check_policy(self.fallback)
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {self.threshold}")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError("refusal_text must be a non-empty string: fail_closed shows it instead of a "
                             f"flagged answer; got {self.refusal_text!r}")

    def generation_kwargs(self) -> dict:
        gen = dict(self.generation)
        if self.max_new_tokens:
            gen["max_new_tokens"] = self.max_new_tokens
        return gen


@dataclass
class RoutedAnswer:
    text: str                    # what the user sees
    flagged: bool
    corrected: bool              # True when the aligner's correction is shown
    fallback_used: str | None    # "fail_open" / "fail_closed" / None
    problem: str | None = None   # the aligner's note or failure reason, in words
    reason: Reason | None = None  # why the correction is not shown (None when it is, or unflagged)


@dataclass
class Moderation:
    """The outcome for one pair. ``error`` (with ``score`` None) means the pair could not be scored:
    nothing was decided for it (the batch job writes an error row, the ingress an item error)."""

    score: float | None
    flagged: bool
    answer: str                      # the text to show the user
    original_answer: str
    corrected: bool                  # True when ``answer`` is the aligner's correction
    corrected_answer: str | None     # aligner output or refusal text; None when untouched
    corrected_score: float | None    # the inspector's score of ``corrected_answer``
    fallback: str | None             # the policy applied, if any
    problem: str | None = None       # why the aligner's output was not used, in words
    timings_ms: dict = field(default_factory=dict)
    reason: Reason | None = None     # why the aligner's output was not used, typed (the metrics label)
    error: str | None = None         # why the pair could not be scored

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = self.reason.value if self.reason is not None else None
        return d


def route(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The routing decision: a pair goes to the aligner iff its score reaches the threshold."""
    return np.asarray(scores, dtype=float) >= float(threshold)


def decide(answer: str, flagged: bool, result: CorrectionResult | None, config: PipelineConfig,
           missing: tuple[Reason, str] | None = None) -> RoutedAnswer:
    """What one pair shows: unflagged, untouched; flagged, its usable correction or the fallback
    policy. ``result`` None: no correction came back, for ``missing`` (reason, words)."""
    if not flagged:
        return RoutedAnswer(answer, False, False, None)
    text, used = apply_fallback(answer, result, config.fallback, config.refusal_text)
    if result is None:
        reason, problem = missing or (Reason.NO_ALIGNER, NO_ALIGNER)
    else:
        problem = result.problem
        reason = None if used is None else (result.reason or Reason.EMPTY_OUTPUT)
    return RoutedAnswer(text, True, used is None, used, problem, reason)


def reinspect_targets(routed: list[RoutedAnswer], config: PipelineConfig) -> list[int]:
    """Rows whose correction the inspector scores again (none when ``reinspect`` is off)."""
    if not config.reinspect:
        return []
    return [i for i, r in enumerate(routed) if r is not None and r.flagged and r.corrected]


def reject_flagged_corrections(answers: Sequence[str], routed: list[RoutedAnswer],
                               corrected_scores: dict[int, float], threshold: float,
                               config: PipelineConfig) -> None:
    """Re-inspection counts: each correction whose score still reaches ``threshold`` is replaced,
    in place, by the fallback policy's answer (the same ``apply_fallback`` as a failed correction),
    and its score leaves ``corrected_scores`` (it scored a text that is no longer shown; the score
    is in ``problem``)."""
    for i in sorted(corrected_scores):
        score = corrected_scores[i]
        if not bool(route([score], threshold)[0]):
            continue
        text, used = apply_fallback(answers[i], None, config.fallback, config.refusal_text)
        routed[i] = RoutedAnswer(text, True, False, used,
                                 f"{STILL_FLAGGED} (score {score:.3f} >= threshold {float(threshold):.3f})",
                                 Reason.STILL_FLAGGED)
        del corrected_scores[i]


def finish(queries: Sequence[str], answers: Sequence[str], scores: Sequence[float | None],
           routed: list[RoutedAnswer | None], corrected_scores: dict[int, float],
           timings_ms: dict | None = None, errors: dict[int, str] | None = None) -> list[Moderation]:
    """Assemble per-pair results from the routing, the aligner's answers and the re-inspection;
    a pair in ``errors`` (its scoring failed; ``routed`` None) gets a result with that error."""
    out = []
    errors = errors or {}
    for i, (a, s, r) in enumerate(zip(answers, scores, routed)):
        if i in errors or r is None:
            out.append(Moderation(None, False, a, a, False, None, None, None,
                                  timings_ms=dict(timings_ms or {}), error=errors.get(i, "not scored")))
            continue
        changed = r.flagged and r.text != a
        out.append(Moderation(
            score=float(s), flagged=r.flagged, answer=r.text, original_answer=a,
            corrected=bool(r.corrected), corrected_answer=r.text if changed else None,
            corrected_score=corrected_scores.get(i), fallback=r.fallback_used, problem=r.problem,
            timings_ms=dict(timings_ms or {}), reason=r.reason))
    return out
