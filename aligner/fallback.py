"""What the pipeline shows when no correction can be used: one pure function shared by the batch
job and the server, so both apply the policy identically."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .model import CorrectionResult

FALLBACK_POLICIES = ("fail_open", "fail_closed")

#: The safe refusal that ``fail_closed`` shows instead of a flagged answer.
DEFAULT_REFUSAL = (
    "I'm sorry, but I can't help with that. If you are dealing with a difficult situation, "
    "please consider reaching out to someone you trust or to a qualified professional."
)


def check_policy(policy: str) -> str:
    if policy not in FALLBACK_POLICIES:
        raise ValueError(f"fallback policy must be one of {FALLBACK_POLICIES}, got {policy!r}")
    return policy


def apply_fallback(original_answer: str, result: "CorrectionResult | None", policy: str,
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
