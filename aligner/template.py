"""Prompt template and deliberate shortening of over-long inputs.

The default template is the one the released Aligner checkpoints (e.g. ``aligner/aligner-7b-v1.0``)
were trained with, so such a checkpoint works unchanged. Models this project trains store their
template in ``aligner_config.json`` so training and inference can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEMPLATE = (
    "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more "
    "helpful and harmless: {question} | {answer} ASSISTANT:"
)
#: What replaces the cut-out middle of an over-long answer (or query).
SHORTEN_MARKER = " [...] "


def validate_template(template: str) -> str:
    """Reject a template the model could not be prompted with (missing or unknown fields)."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("template must be a non-empty string with {question} and {answer}")
    for field in ("{question}", "{answer}"):
        if field not in template:
            raise ValueError(f"template must contain {field}: {template!r}")
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"template may only use the fields {{question}} and {{answer}} "
            f"(write literal braces as {{{{ }}}}): {exc!r}") from None
    return template


def format_prompt(template: str, question: str, answer: str) -> str:
    """Fill the template; str.format never interprets braces inside the filled-in values."""
    return template.format(question=question, answer=answer)


@dataclass
class ShortenedInput:
    prompt: str
    shortened: bool
    n_tokens: int


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` (no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(s) for s in enc["offset_mapping"]]


def _cut_middle(text: str, spans: list[tuple[int, int]], keep: int, head_share: float) -> str:
    """Keep about ``keep`` tokens of ``text``: its head and tail, joined by the marker."""
    if keep >= len(spans):
        return text
    keep = max(keep, 2)
    head = max(1, int(round(keep * head_share)))
    tail = max(1, keep - head)
    head_end = spans[head - 1][1]
    tail_start = spans[len(spans) - tail][0]
    return text[:head_end].rstrip() + SHORTEN_MARKER + text[tail_start:].lstrip()


def build_prompt(tokenizer, template: str, question: str, answer: str, max_tokens: int,
                 min_answer_tokens: int = 32) -> ShortenedInput:
    """Return the prompt, shortened to at most ``max_tokens`` tokens (special tokens included).

    Why this order: the question decides what a good correction is, so it is kept whole while
    the answer's middle is cut (its start and end carry most of the intent). Only when the
    question alone would leave less than ``min_answer_tokens`` for the answer is the question cut
    too, keeping its end (for dialogues, the last user turn).
    """
    prompt = format_prompt(template, question, answer)
    n = _count(tokenizer, prompt)
    if n <= max_tokens:
        return ShortenedInput(prompt, False, n)
    base = _count(tokenizer, format_prompt(template, "", ""))
    marker = len(tokenizer(SHORTEN_MARKER, add_special_tokens=False)["input_ids"])
    q_spans = _token_spans(tokenizer, question)
    a_spans = _token_spans(tokenizer, answer)
    slack = 2
    budget = max_tokens - base - slack
    if budget < 8:
        raise ValueError(
            f"max_input_tokens={max_tokens} leaves no room for the question and answer "
            f"(the template alone takes {base} tokens)")
    q_keep = len(q_spans)
    a_room = max(min(min_answer_tokens, budget // 2), 4)
    if q_keep + a_room + marker > budget:
        q_keep = max(budget - a_room - 2 * marker, 2)
    q_text = _cut_middle(question, q_spans, q_keep, head_share=1 / 3)
    q_used = min(q_keep + (marker if q_keep < len(q_spans) else 0), len(q_spans))
    a_keep = max(budget - q_used - marker, 2)
    for _ in range(6):  # re-tokenising joined text can differ by a few tokens: shrink until it fits
        a_text = _cut_middle(answer, a_spans, a_keep, head_share=0.5)
        prompt = format_prompt(template, q_text, a_text)
        n = _count(tokenizer, prompt)
        if n <= max_tokens:
            return ShortenedInput(prompt, True, n)
        a_keep = max(a_keep - (n - max_tokens) - 2, 2)
        if a_keep == 2:
            q_keep = max(q_keep - (n - max_tokens) - 2, 2)
            q_text = _cut_middle(question, q_spans, q_keep, head_share=1 / 3)
    raise ValueError(f"could not shorten the input to {max_tokens} tokens (got {n})")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])
