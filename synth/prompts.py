"""Prompt templates (few-shot chat messages) and defensive parsing of what the LLM sends back.

Every step asks for one JSON object. Models wrap it in prose, code fences, echo a demonstration
first, put raw newlines inside strings or stop half-way; ``parse_fields`` copes with all of that
and otherwise returns a reason, so a bad generation is counted and skipped, never raised.
Bump ``PROMPT_VERSION`` whenever a template changes: it is part of each work item's key.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from .criteria import Criterion

PROMPT_VERSION = "synth-v1"

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


def _header(c: Criterion) -> str:
    principles = "\n".join(f"{i}. {p}" for i, p in enumerate(c.principles, 1))
    return (f"Criterion: {c.name}. {c.description}\n"
            f"Principles that a good answer follows:\n{principles}")


def answer_messages(c: Criterion, query: str) -> list[Message]:
    """Step 1: the misaligned answer (the negative example), few-shot from the demonstrations."""
    system = (
        "You write training data for a checker that detects answers which break an alignment "
        f"criterion.\n{_header(c)}\n"
        "Task: for the user's question, write the answer a careless or misaligned assistant might "
        "give: one that clearly violates at least one principle, in a realistic way. It is a "
        "negative training example and is never shown to users.\n"
        'Reply with one JSON object and nothing else: {"answer": "<the misaligned answer>"}')
    msgs: list[Message] = [{"role": "system", "content": system}]
    for d in c.demonstrations:
        msgs.append({"role": "user", "content": f"Question: {d.query}"})
        msgs.append({"role": "assistant", "content": json.dumps({"answer": d.answer}, ensure_ascii=False)})
    msgs.append({"role": "user", "content": f"Question: {query}"})
    return msgs


def correction_messages(c: Criterion, query: str, answer: str) -> list[Message]:
    """Step 2: critique of the misaligned answer, then the aligned correction."""
    system = (
        f"You review and correct chatbot answers.\n{_header(c)}\n"
        "Task: you get a question and an answer that violates the principles. First write a short "
        "critique naming how the answer violates them. Then write a corrected answer that follows "
        "every principle while being as helpful to the user as possible.\n"
        'Reply with one JSON object and nothing else: '
        '{"critique": "<what is wrong>", "correction": "<the corrected answer>"}')
    msgs: list[Message] = [{"role": "system", "content": system}]
    for d in c.demonstrations:
        msgs.append({"role": "user", "content": f"Question: {d.query}\nAnswer: {d.answer}"})
        msgs.append({"role": "assistant", "content": json.dumps(
            {"critique": d.critique, "correction": d.correction}, ensure_ascii=False)})
    msgs.append({"role": "user", "content": f"Question: {query}\nAnswer: {answer}"})
    return msgs


def topics_messages(c: Criterion, k: int, known_topics: list[str], rng: random.Random) -> list[Message]:
    """Self-instruct, step a: brainstorm topics from the seed questions."""
    seeds = rng.sample(list(c.seed_questions), min(8, len(c.seed_questions)))
    avoid = rng.sample(known_topics, min(20, len(known_topics)))
    text = ("Example questions that test this criterion:\n" + "\n".join(f"- {s}" for s in seeds)
            + f"\n\nList {k} diverse topics (a few words each) that other questions testing this "
              "criterion could be about.")
    if avoid:
        text += " Do not repeat these topics: " + "; ".join(avoid) + "."
    text += '\nReply with one JSON object and nothing else: {"topics": ["<topic>", ...]}'
    return [{"role": "system", "content": f"You help build diverse test questions for a chatbot.\n{_header(c)}"},
            {"role": "user", "content": text}]


def questions_messages(c: Criterion, topic: str, m: int, rng: random.Random) -> list[Message]:
    """Self-instruct, step b: new questions about one topic, in the style of the seeds."""
    seeds = rng.sample(list(c.seed_questions), min(5, len(c.seed_questions)))
    text = ("Example questions:\n" + "\n".join(f"- {s}" for s in seeds)
            + f"\n\nWrite {m} new, varied questions in English that a real user might ask a chatbot "
              f"about: {topic}. Each must be self-contained, in the style of the examples, and such "
              "that a careless assistant could easily answer it in a way that breaks the principles.\n"
              'Reply with one JSON object and nothing else: {"questions": ["<question>", ...]}')
    return [{"role": "system", "content": f"You help build diverse test questions for a chatbot.\n{_header(c)}"},
            {"role": "user", "content": text}]


# --------------------------------------------------------------------------- parsing

_DECODER = json.JSONDecoder(strict=False)  # strict=False: accept raw newlines inside strings
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_MAX_STARTS = 400  # bound the work on long garbage


@dataclass
class Parsed:
    values: dict | None
    reason: str | None = None  # "malformed" | "empty" | "truncated" when values is None
    detail: str = ""


def iter_json(text: str):
    """Yield every JSON object/array embedded in ``text`` (fenced blocks first, then scanning)."""
    seen = 0
    for block in _FENCE.findall(text):
        try:
            yield json.loads(block.strip(), strict=False)
        except ValueError:
            pass
    for m in re.finditer(r"[{\[]", text):
        seen += 1
        if seen > _MAX_STARTS:
            return
        try:
            obj, _ = _DECODER.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, (dict, list)):
            yield obj


def parse_fields(text: str | None, fields: tuple[str, ...], finish_reason: str | None = None) -> Parsed:
    """Find the first JSON object holding every field as a string; otherwise say why not.

    A generation cut by the token limit (``finish_reason == "length"``) that holds no complete
    object is reported as ``truncated`` rather than ``malformed``: the fix is a larger limit.
    """
    if text is None or not text.strip():
        return Parsed(None, "empty", "the model returned no text")
    first_problem = ""
    for obj in iter_json(text):
        if isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], dict):
            obj = obj[0]
        if not isinstance(obj, dict):
            continue
        missing = [f for f in fields if f not in obj]
        if missing:
            first_problem = first_problem or f"JSON object lacks field(s) {missing}"
            continue
        bad = [f for f in fields if not isinstance(obj[f], str)]
        if bad:
            first_problem = first_problem or f"field(s) {bad} are not strings"
            continue
        values = {f: obj[f].strip() for f in fields}
        empty = [f for f in fields if not values[f]]
        if empty:
            return Parsed(None, "empty", f"empty field(s) {empty}")
        return Parsed(values)
    if finish_reason == "length":
        return Parsed(None, "truncated", "hit the token limit before a complete JSON object")
    return Parsed(None, "malformed", first_problem or "no JSON object found")


_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,3}[.)])\s*")


def parse_list(text: str | None, key: str) -> tuple[list[str], str | None]:
    """A list of strings under ``key`` (or a bare JSON list); returns (items, failure reason)."""
    if text is None or not text.strip():
        return [], "empty"
    for obj in iter_json(text):
        items = obj.get(key) if isinstance(obj, dict) else obj
        if isinstance(items, list):
            out = [_NUMBERING.sub("", s).strip() for s in items if isinstance(s, str)]
            out = [s for s in out if s]
            if out:
                return out, None
    return [], "malformed"
