"""Send only the flagged rows to the aligner and apply the fallback policy to every flagged row.

Shared by the batch job and the server: unflagged answers pass through untouched and cost no
generation; a flagged answer gets its correction, or the policy's fallback when there is no
aligner, it failed on that item, or its output was degenerate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .fallback import DEFAULT_REFUSAL, apply_fallback, check_policy


@dataclass
class RoutedAnswer:
    text: str                   # what the user sees
    flagged: bool
    corrected: bool             # True when the aligner's correction is shown
    fallback_used: str | None   # "fail_open" / "fail_closed" / None
    problem: str | None = None  # the aligner's note or failure reason, if any


def correct_flagged(aligner, queries: Sequence[str], answers: Sequence[str], flagged: Sequence[bool],
                    policy: str = "fail_open", refusal: str = DEFAULT_REFUSAL,
                    **generation) -> list[RoutedAnswer]:
    """One RoutedAnswer per input row, in order; ``aligner`` may be None (no aligner configured)."""
    check_policy(policy)
    if not len(queries) == len(answers) == len(flagged):
        raise ValueError(f"lengths differ: {len(queries)} queries, {len(answers)} answers, "
                         f"{len(flagged)} flags")
    idx = [i for i, f in enumerate(flagged) if f]
    results = {}
    if aligner is not None and idx:
        try:
            detailed = aligner.correct_detailed([queries[i] for i in idx], [answers[i] for i in idx],
                                                **generation)
            results = dict(zip(idx, detailed))
        except Exception as exc:  # noqa: BLE001 - the aligner failing must not lose the rows
            problem = f"aligner error: {type(exc).__name__}: {exc}"
            results = {i: None for i in idx}
            errors = {i: problem for i in idx}
        else:
            errors = {}
    else:
        errors = {i: ("no aligner configured" if aligner is None else None) for i in idx}
    out = []
    for i, (q, a, f) in enumerate(zip(queries, answers, flagged)):
        if not f:
            out.append(RoutedAnswer(a, False, False, None))
            continue
        res = results.get(i)
        text, used = apply_fallback(a, res, policy, refusal)
        problem = res.problem if res is not None else errors.get(i)
        out.append(RoutedAnswer(text, True, used is None, used, problem))
    return out
