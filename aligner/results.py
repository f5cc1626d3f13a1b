"""The aligner's result type and the reasons a correction is not shown, torch-free: the Serve
ingress and the pipeline's core import them without loading the model code (``aligner.model``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Reason(str, Enum):
    """Why a flagged pair's correction is not shown (the fallback policy applies). The value is the
    metrics label (``moderation_fallbacks_total{reason=...}``); ``problem`` keeps the human text."""

    NO_ALIGNER = "no_aligner"            # no aligner configured
    ALIGNER_ERROR = "aligner_error"      # the aligner (or its deployment) raised / failed to generate
    TIMEOUT = "timeout"                  # a deadline passed (the model's own, or the caller's)
    OVERLOADED = "overloaded"            # the aligner deployment's queue was full
    INVALID_INPUT = "invalid_input"      # the pair could not be encoded for the aligner
    EMPTY_OUTPUT = "empty_output"        # the aligner wrote nothing
    DEGENERATE = "degenerate"            # runaway repetition
    UNUSABLE = "unusable_output"         # a failed result that names no reason (a third-party aligner)
    STILL_FLAGGED = "still_flagged"      # the inspector still flags the correction on re-inspection


#: Failures of the aligner step itself (counted as ``moderation_errors_total{stage="aligner"}``)
ALIGNER_FAILURES = frozenset({Reason.ALIGNER_ERROR, Reason.TIMEOUT, Reason.OVERLOADED})


@dataclass
class CorrectionResult:
    """One correction. ``ok=False`` means the caller's fallback applies; ``reason`` says why (typed)
    and ``problem`` in words, or ``problem`` carries a note (e.g. "input shortened") that does not
    make the result unusable (``reason`` None)."""

    text: str
    ok: bool
    problem: str | None = None
    new_tokens: int = 0
    notes: list[str] = field(default_factory=list)
    reason: Reason | None = None

    def __post_init__(self):
        if self.reason is not None:
            self.reason = Reason(self.reason)
        elif not self.ok:
            self.reason = Reason.UNUSABLE

    @classmethod
    def failed(cls, reason: Reason, problem: str, **kw) -> "CorrectionResult":
        return cls("", False, problem, reason=reason, **kw)


def degenerate_reason(problem: str | None) -> Reason | None:
    """The reason for ``detect_degenerate``'s verdict (None: the output looks fine)."""
    if problem is None:
        return None
    return Reason.EMPTY_OUTPUT if problem == "empty output" else Reason.DEGENERATE
