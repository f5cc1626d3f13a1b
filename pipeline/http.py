"""What crosses the ingress's HTTP boundary, without Ray: request bodies in, errors and JSON out.

- ``ApiError`` and its two kinds: ``RequestError`` (the request itself is unusable, or the upstream
  failed it) and ``StageError`` (a step could not run: the inspector, admission). Code anywhere
  in the request's path raises them; ``add_error_handlers`` turns them into the one error answer,
  ``{"detail": ...}`` with the status (and ``Retry-After`` when there is one), as FastAPI
  exception handlers on the ingress app; ``UpstreamRefused`` (the upstream's 4xx) is passed on
  as it came.
- ``parse_moderate_body`` / ``parse_chat_body``: ``/v1/moderate`` and ``/v1/chat/completions``
  bodies, hostile JSON included, to pairs or a query, with a clear 4xx otherwise.
- ``moderation_json`` / ``moderation_choice`` / ``apply_to_chat_response``: results to JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .routing import Moderation
from .tables import extract_pair


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An answer other than success: HTTP ``status`` with ``{"detail": detail}`` (and a
    ``Retry-After`` header when ``retry_after_s`` is set)."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s


class RequestError(ApiError):
    """A whole request is unusable (4xx), or the upstream failed it (502, 504)."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)


class StageError(ApiError):
    """A step could not run for this request: the inspector could not score it (503; 422 for a
    text it rejects), or admission refused it (503 with ``retry_after_s``)."""

    def __init__(self, stage: str, detail: str, status: int = 503, retry_after_s: int | None = None):
        super().__init__(status, detail, retry_after_s)
        self.stage = stage


class UpstreamRefused(Exception):
    """The upstream answered the request with a 4xx (bad key, unknown model...): returned to the
    client as it came."""

    def __init__(self, status: int, content: Any):
        super().__init__(f"upstream answered {status}")
        self.status, self.content = status, content


def error_stage(exc: ApiError) -> str:
    """The ``errors_total{stage}`` label of a request that ended with ``exc``."""
    if isinstance(exc, StageError):
        return "shed" if exc.stage == "admission" else exc.stage
    return "upstream" if exc.status in (502, 504) else "bad_request"


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: last line of the message``, for an error's detail."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:limit]


def error_response(status: int, detail: str, retry_after_s: int | None = None):
    """The ingress's one error shape: ``{"detail": ...}`` (and ``Retry-After``)."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def add_error_handlers(app) -> None:
    """Answer ``ApiError`` and ``UpstreamRefused`` raised by any endpoint of the FastAPI ``app``."""
    from fastapi.responses import JSONResponse

    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.detail, exc.retry_after_s)

    async def upstream_refused(request, exc: UpstreamRefused):
        return JSONResponse(exc.content, status_code=exc.status)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(UpstreamRefused, upstream_refused)


# ----------------------------------------------------------------------------- request bodies
@dataclass
class PairItem:
    index: int
    query: str | None = None
    answer: str | None = None
    error: str | None = None


def parse_moderate_body(raw: bytes, max_items: int, max_chars: int) -> tuple[bool, list[PairItem]]:
    """``(is_list, items)`` for a ``/v1/moderate`` body: one ``{query, answer}`` object (or
    ``{messages: [...]}`` as in the batch job) or a list of them. A bad item in a list gets its own
    error; a single bad object or an unusable body raises ``RequestError``."""
    body = _json_body(raw)
    if isinstance(body, dict):
        item = _parse_item(0, body, max_chars)
        if item.error:
            raise RequestError(422, item.error)
        return False, [item]
    if isinstance(body, list):
        if not body:
            raise RequestError(422, "empty list: send one {query, answer} object or a non-empty list of them")
        if len(body) > max_items:
            raise RequestError(413, f"{len(body)} items in one request; the limit is {max_items} (max_items): "
                                    f"split the list into requests of at most {max_items} pairs")
        items = [_parse_item(i, x, max_chars) for i, x in enumerate(body)]
        for it in items:
            if it.error:
                it.error = f"item {it.index}: {it.error}"
        return True, items
    raise RequestError(422, f"expected a JSON object {{query, answer}} or a list of them, "
                            f"got {type(body).__name__}")


def _json_body(raw: bytes):
    if not raw or not raw.strip():
        raise RequestError(400, "empty request body: expected JSON")
    try:
        return json.loads(raw, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, NaN/Infinity/1e999, a number past Python's digit limit
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    """A number too large for a float (``1e999``) would become infinity: refused like ``Infinity``."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number (it would be {value}, which is not a JSON value)")
    return value


def _parse_item(i: int, x, max_chars: int) -> PairItem:
    if not isinstance(x, dict):
        return PairItem(i, error=f"expected an object with 'query' and 'answer', got {type(x).__name__}")
    try:
        q, a = extract_pair(x)
    except ValueError as exc:
        return PairItem(i, error=str(exc))
    for name, v in (("query", q), ("answer", a)):
        if len(v) > max_chars:
            return PairItem(i, error=f"field {name!r} is too long ({len(v)} characters; the limit is {max_chars})")
    return PairItem(i, q, a)


def message_text(content) -> str | None:
    """Text of an OpenAI message ``content``: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        parts = [p for p in parts if isinstance(p, str)]
        return "\n".join(parts) if parts else None
    return None


def parse_chat_body(raw: bytes, max_chars: int) -> tuple[dict, str]:
    """The request to forward and the query to moderate against (the last user turn's text).
    ``"stream": true`` is allowed (the caller streams it through ``pipeline.streaming``) with n=1."""
    body = _json_body(raw)
    if not isinstance(body, dict):
        raise RequestError(422, f"expected a JSON object (an OpenAI chat completion request), got {type(body).__name__}")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise RequestError(422, f"field 'stream' must be true or false, got {body['stream']!r}")
    if body.get("stream") and body.get("n") not in (None, 1):
        raise RequestError(400, f"stream=true with n={body['n']!r} is not supported: a streamed answer is "
                                f"gated one choice at a time; send n=1 or stream=false")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "field 'messages' must be a non-empty list of {role, content}")
    query = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(422, f"messages[{i}] must be an object with a string 'role'")
        if m["role"] == "user":
            text = message_text(m.get("content"))
            if text is not None and text.strip():
                query = text
    if query is None:
        raise RequestError(422, "messages has no 'user' turn with text content to moderate against")
    if len(query) > max_chars:
        raise RequestError(422, f"the last user message is too long ({len(query)} characters; "
                                f"the limit is {max_chars})")
    try:  # the body is forwarded upstream as UTF-8 JSON: a lone surrogate anywhere cannot be
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(422, f"the request holds text that is not valid Unicode (a lone surrogate, "
                                f"{exc.object[max(exc.start - 20, 0):exc.start]!r}...)") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    return body, query


# ----------------------------------------------------------------------------- results as JSON
def _finite_or_none(x):
    return None if x is not None and not math.isfinite(x) else x


def moderation_json(m: Moderation, index: int | None = None) -> dict:
    """One ``/v1/moderate`` result (with its ``index`` in a list)."""
    d = m.to_dict()
    if d.get("error") is None:  # an item's "error" key means it failed (parse_moderate_body)
        d.pop("error", None)
    if index is not None:
        d = {"index": index, **d}
    d["corrected_score"] = _finite_or_none(d.get("corrected_score"))
    return d


def moderation_choice(m: Moderation, index: int, expose_original: bool = False) -> dict:
    """One choice's entry in a chat response's ``moderation.choices`` (the non-stream response and
    a stream's last chunk alike). The upstream text is there only with ``expose_original``."""
    d = m.to_dict()
    c = {"index": index, "score": d["score"], "flagged": d["flagged"], "corrected": d["corrected"],
         "fallback": d["fallback"], "problem": d["problem"],
         "corrected_score": _finite_or_none(d["corrected_score"]), "timings_ms": d["timings_ms"]}
    if expose_original:
        c["original_content"] = d["original_answer"]
    return c


def apply_to_chat_response(resp: dict, results: dict[int, Moderation | str], upstream_ms: float,
                           expose_original: bool = False) -> dict:
    """The upstream's OpenAI response with each moderated choice's content replaced by the final
    answer, plus a top-level ``moderation`` field (per choice: score, flagged, corrected, ...).

    The upstream's text of a replaced answer (corrected, or refused by fail_closed) is the text
    moderation kept from the caller, so no field carries it: not ``moderation``, and not the
    choice's ``logprobs`` (its tokens spell it out; set to null). ``expose_original`` (a
    ``ServeSettings`` flag for trusted callers) adds it as ``original_content``."""
    per_choice = []
    for i, choice in enumerate(resp.get("choices", [])):
        r = results.get(i)
        if isinstance(r, Moderation):
            replaced = r.answer != r.original_answer
            choice["message"]["content"] = r.answer
            if replaced and not expose_original and choice.get("logprobs") is not None:
                choice["logprobs"] = None
            per_choice.append(moderation_choice(r, choice.get("index", i), expose_original))
        else:
            per_choice.append({"index": choice.get("index", i), "skipped": r or "no text content to moderate"})
    resp["moderation"] = {
        "flagged": any(c.get("flagged") for c in per_choice),
        "corrected": any(c.get("corrected") for c in per_choice),
        "upstream_ms": round(upstream_ms, 2),
        "choices": per_choice,
    }
    return resp
