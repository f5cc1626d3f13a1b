"""Streamed answers through the inspector gate: ``/v1/chat/completions`` with ``"stream": true``.

Plain Python (no Ray): ``StreamGate`` is the whole behaviour, the Serve ingress
(``pipeline.serve.Moderator``) only wraps its events in an HTTP response. It is one more caller of
the moderation core: every check is the inspector's score of (last user turn, answer so far) through
``ModerationFlow.check``, the routing decision is ``routing.route``, and the stream's outcome
(correction, re-inspection, fallback policy, typed reasons) is ``pipeline.core.moderate`` run on the
answer so far with the score the check already has.

How the text moves (``ServeSettings.stream_*``):

- The upstream's deltas are **held**. A **check** runs when a sentence ends at or past
  ``stream_check_chars`` held characters (it covers the text up to the last such end; a delta
  across it is split), once ``stream_check_chars`` are held (``stream_sentence_boundaries=false``),
  when ``stream_max_holdback_chars`` are held whatever they end with, and when the upstream ends.
- A check scores the **whole answer so far** (the released text plus the held text it covers)
  against the last user turn. If it passes, that text is released to the client as
  ``chat.completion.chunk`` events; no character is sent before a passing check covered it. The
  upstream is not read while a check runs (its output waits in the socket buffers).
- The check at the upstream's end covers all the text before the rest is released.
- A check that flags stops the stream: the upstream request is closed at once, the held text is
  never sent, and ``core.moderate`` decides what replaces it from (query, the checked answer so
  far): the aligner's correction (re-inspected), else the fallback policy (``fail_closed``: the
  refusal text; ``fail_open``: the answer so far as it came). The client already holds the released prefix, so
  only the unreleased remainder can be replaced: when the final text starts with the released
  prefix, its rest is sent; otherwise ``CONTINUATION_SEPARATOR`` and the whole final text follow
  the prefix (nothing released yet: the final text alone, as the non-stream proxy answers). The
  stream then ends with ``finish_reason: "content_filter"``.
- The last chunk (``choices: []``) carries ``moderation``, the non-stream response's object plus a
  ``stream`` part (checks, released characters, time to first token, hold-back), then ``data: [DONE]``.

Failures: the upstream failing or closing before its end, or the inspector failing, after text was
released: the released text stays delivered, the held text is dropped, and an ``error`` event in
OpenAI's shape ends the stream (no ``[DONE]``). Before any text was released they raise instead, so
the ingress answers a plain HTTP error (502/504 upstream, 503 inspector). The consumer closing the
event generator (the client went away) closes the upstream request.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .admission import Admission, pair_cost
from .flow import ModerationFlow
from .http import RequestError, StageError, UpstreamRefused, message_text, moderation_choice, short_error
from .routing import Moderation, route
from .settings import ServeSettings

#: Between the released prefix and a final text that does not continue it (a correction that
#: rewrote the beginning, the refusal text).
CONTINUATION_SEPARATOR = "\n\n"
DONE = "data: [DONE]\n\n"
ENDPOINT = "chat_stream"

# a sentence ends with . ! ? ... (closing quotes or brackets may follow) before a space or the end
# of the text received so far, or with a line break
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n")


def sse(payload: dict) -> str:
    """One server-sent event (``data: {json}`` and a blank line)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_payload(message: str, type_: str, code: str) -> dict:
    """An error event as OpenAI streams one (the ``openai`` client raises ``APIError`` on it)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# ----------------------------------------------------------------------------- when to check
@dataclass(frozen=True)
class CheckPolicy:
    """When held text is due for a check (``ServeSettings.stream_*``)."""

    check_chars: int = 100
    sentence_boundaries: bool = True
    max_holdback_chars: int = 400

    @classmethod
    def from_settings(cls, s: ServeSettings) -> "CheckPolicy":
        return cls(s.stream_check_chars, s.stream_sentence_boundaries, s.stream_max_holdback_chars)

    def cut(self, held: str) -> int | None:
        """How much of the held text the next check covers now, or None (keep reading): up to
        its last sentence end at or past ``check_chars``; all of it from ``max_holdback_chars``
        on (or from ``check_chars`` on, without sentence boundaries)."""
        n = len(held)
        if n < self.check_chars:
            return None
        if not self.sentence_boundaries:
            return n
        ends = [m.end() for m in _SENTENCE_END.finditer(held, max(0, self.check_chars - 8))
                if m.end() >= self.check_chars]
        if ends:
            return ends[-1]
        return n if n >= self.max_holdback_chars else None

    def due(self, held: str) -> bool:
        return self.cut(held) is not None


@dataclass
class _Held:
    """Deltas received but not yet cleared: what a passing check releases."""

    parts: list[tuple[dict, Any, float]] = field(default_factory=list)  # (delta, logprobs, arrival)
    text: str = ""

    def add(self, delta: dict, logprobs: Any, now: float) -> None:
        self.parts.append((delta, logprobs, now))
        content = delta.get("content")
        if isinstance(content, str):
            self.text += content

    def clear(self) -> None:
        self.parts, self.text = [], ""

    def take(self, n: int) -> "_Held":
        """The deltas of the first ``n`` characters, taken out (a delta across the cut is split;
        its logprobs, which would spell the part still held, are left out of both halves)."""
        first = _Held()
        while self.parts and len(first.text) < n:
            delta, logprobs, t = self.parts[0]
            content = delta.get("content") if isinstance(delta.get("content"), str) else ""
            room = n - len(first.text)
            if len(content) <= room:
                first.add(delta, logprobs, t)
                self.parts.pop(0)
                continue
            first.add({**delta, "content": content[:room]}, None, t)
            self.parts[0] = ({k: v for k, v in delta.items() if k != "tool_calls"} | {"content": content[room:]},
                             None, t)
        self.text = self.text[len(first.text):]
        return first


# ----------------------------------------------------------------------------- the upstream
class UpstreamError(Exception):
    """The upstream's stream failed after it started (an error event, a broken or early-closed
    connection, a read timeout, something that is not a chunk)."""

    def __init__(self, message: str, code: str = "upstream_error"):
        super().__init__(message)
        self.message, self.code = message, code


class UpstreamStream:
    """One streamed chat completion request to an OpenAI-compatible upstream over an
    ``httpx.AsyncClient``: ``open`` (status checked), ``chunks`` (parsed ``data:`` events),
    ``aclose`` (closes the connection, also half-way through: the upstream sees it closed).

    An upstream that ignores ``stream`` and answers one JSON completion is read as one chunk."""

    def __init__(self, client, url: str, body: dict, headers: dict | None = None, timeout_s: float | None = None):
        self.client, self.url, self.body, self.headers = client, url, body, dict(headers or {})
        self.timeout_s = timeout_s
        self.response = None
        self.upstream_ms: float | None = None
        self.done = False  # the upstream sent data: [DONE]

    async def open(self) -> None:
        import httpx

        t = time.perf_counter()
        headers = {**self.headers, "Accept": "text/event-stream"}
        try:
            req = self.client.build_request("POST", self.url, json=self.body, headers=headers)
            self.response = await self.client.send(req, stream=True)
        except httpx.TimeoutException:
            raise RequestError(504, f"upstream timed out after {self.timeout_s} s ({self.url})") from None
        except httpx.HTTPError as exc:
            raise RequestError(502, f"upstream unreachable ({self.url}): {short_error(exc)}") from None
        self.upstream_ms = (time.perf_counter() - t) * 1e3
        r = self.response
        if r.status_code >= 400:
            try:
                raw = await r.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await self.aclose()
            text = raw.decode("utf-8", "replace")
            if r.status_code >= 500:
                raise RequestError(502, f"upstream returned {r.status_code}: {text[:300]}")
            try:
                content: Any = json.loads(text)
            except ValueError:
                content = {"detail": text[:1000]}
            raise UpstreamRefused(r.status_code, content)

    async def chunks(self) -> AsyncIterator[dict]:
        """The upstream's chunks, in order, until ``[DONE]`` or the end of the body."""
        import httpx

        r = self.response
        try:
            if "json" in r.headers.get("content-type", "") and "event-stream" not in r.headers.get("content-type", ""):
                yield _completion_as_chunk(json.loads(await r.aread()))
                self.done = True
                return
            data: list[str] = []
            event = None
            async for line in r.aiter_lines():
                if line == "":
                    if data:
                        payload = "\n".join(data)
                        data, ev, event = [], event, None
                        if payload.strip() == "[DONE]":
                            self.done = True
                            return
                        yield _parse_event(payload, ev)
                    continue
                if line.startswith(":"):
                    continue  # an SSE comment (keep-alive)
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
            if data:  # a last event without its blank line
                payload = "\n".join(data)
                if payload.strip() == "[DONE]":
                    self.done = True
                    return
                yield _parse_event(payload, event)
        except httpx.TimeoutException:
            raise UpstreamError(f"upstream stopped sending for {self.timeout_s} s", "upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream connection failed: {short_error(exc)}", "upstream_error") from None
        except ValueError as exc:
            raise UpstreamError(f"upstream sent something that is not JSON: {short_error(exc)}", "upstream_error") from None

    async def aclose(self) -> None:
        if self.response is not None:
            await self.response.aclose()


def _parse_event(payload: str, event: str | None) -> dict:
    try:
        obj = json.loads(payload)
    except ValueError:
        raise UpstreamError(f"upstream sent an event that is not JSON: {payload[:200]!r}") from None
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise UpstreamError(f"upstream error: {msg}"[:500], "upstream_error")
    if event == "error":
        raise UpstreamError(f"upstream error: {payload[:300]}", "upstream_error")
    if not isinstance(obj, dict):
        raise UpstreamError(f"upstream sent {type(obj).__name__}, not a chunk object")
    return obj


def _completion_as_chunk(resp: Any) -> dict:
    """A non-stream completion, as the one chunk it would have been."""
    if not isinstance(resp, dict) or not isinstance(resp.get("choices"), list):
        raise UpstreamError("upstream answer has no 'choices' list")
    choices = []
    for i, ch in enumerate(resp["choices"]):
        msg = ch.get("message") if isinstance(ch, dict) else None
        msg = msg if isinstance(msg, dict) else {}
        delta = {k: v for k, v in msg.items() if k in ("role", "tool_calls")}
        text = message_text(msg.get("content"))
        if text is not None:
            delta["content"] = text
        choices.append({"index": ch.get("index", i), "delta": delta, "finish_reason": ch.get("finish_reason")})
    return {**{k: resp[k] for k in ("id", "created", "model", "system_fingerprint", "usage") if k in resp},
            "object": "chat.completion.chunk", "choices": choices}


def _stage_code(exc: StageError) -> str:
    """The error event's code for a check that got no score."""
    return "answer_not_scored" if exc.status == 422 else "inspector_unavailable"


# ----------------------------------------------------------------------------- the gate
@dataclass
class StreamReport:
    """What one stream did (the ``moderation.stream`` object, the metrics, the tests)."""

    checks: int = 0
    released: str = ""               # upstream text released after passing checks
    sent: str = ""                   # all content sent to the client (released + final remainder)
    flagged_at: int | None = None    # characters of upstream text the flagging check covered
    cut: bool = False                # a flag stopped the upstream
    ttft_ms: float | None = None     # request start -> first content chunk
    holdback_ms: float = 0.0         # the longest a delta waited for its check
    holdback_chars: int = 0          # the most text a check covered beyond the released prefix
    inspector_ms: float = 0.0        # scoring time over all checks
    error: str | None = None         # the error event's code, if the stream ended with one
    moderation: Moderation | None = None
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return {"checks": self.checks, "released_chars": len(self.released), "cut": self.cut,
                "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
                "holdback_max_ms": round(self.holdback_ms, 2), "holdback_max_chars": self.holdback_chars,
                "inspector_ms": round(self.inspector_ms, 2)}


class StreamGate:
    """One streamed request: reads ``upstream`` (``open`` / ``chunks`` / ``aclose``), checks the
    answer so far through ``flow`` and yields the client's server-sent events (see the module
    docstring). ``events()`` raises (``RequestError``, ``StageError``, ``UpstreamRefused``) only
    before its first event; afterwards a failure is an error event."""

    def __init__(self, flow: ModerationFlow, query: str, upstream, settings: ServeSettings,
                 admission: Admission | None = None, model: str | None = None,
                 started: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.flow, self.query, self.upstream, self.settings = flow, query, upstream, settings
        self.policy = CheckPolicy.from_settings(settings)
        self.admission, self.clock = admission, clock
        self.started = clock() if started is None else started
        self.report = StreamReport()
        self._meta: dict = {"id": f"chatcmpl-mod-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model or "unknown"}
        self._role_sent = False
        self._usage = None
        self._finish: str | None = None
        self._seen: set = set()
        self._closed = False

    # -- the events -----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[str]:
        try:
            async for ev in self._run():
                yield ev
        finally:
            await self._close_upstream()

    async def _run(self) -> AsyncIterator[str]:
        s, rep, flow = self.settings, self.report, self.flow
        if self.admission is not None:  # overload: 503 at once, before the upstream is asked
            cost = pair_cost(self.query, "x" * s.stream_max_holdback_chars)
            self.admission.check_size(cost)
            self.admission.ensure_room(cost)
        threshold = await flow.threshold()
        await self.upstream.open()
        held = _Held()
        score: float | None = None
        chunks = self.upstream.chunks()
        try:
            async for chunk in chunks:
                self._take_meta(chunk)
                for delta, logprobs in self._deltas(chunk):
                    held.add(delta, logprobs, self.clock())
                while held.text and (cut := self.policy.cut(held.text)) is not None:
                    part = held.take(cut)  # up to the sentence end; the rest stays held
                    score = await self._check(rep.released + part.text)
                    if bool(route([score], threshold)[0]):
                        held.clear()  # the few characters past the checked text go with it
                        async for ev in self._flagged(rep.released + part.text, score, part):
                            yield ev
                        return
                    for ev in self._release(part):
                        yield ev
        except UpstreamError as exc:
            async for ev in self._failed(exc.message, "upstream_error", exc.code):
                yield ev
            return
        except StageError as exc:
            async for ev in self._failed(exc.detail, "moderation_error", _stage_code(exc), exc):
                yield ev
            return
        finally:
            await chunks.aclose()
        if not self.upstream.done and self._finish is None:
            async for ev in self._failed("upstream closed the stream before its end", "upstream_error",
                                         "upstream_closed"):
                yield ev
            return
        await self._close_upstream()
        answer = rep.released + held.text
        if not answer.strip():  # nothing to moderate (tool calls only): passed through as it came
            for ev in self._release(held):
                yield ev
            for ev in self._end(self._finish or "stop", None):
                yield ev
            return
        if held.text or score is None:  # the final check covers all the text
            try:
                score = await self._check(answer)
            except StageError as exc:
                async for ev in self._failed(exc.detail, "moderation_error", _stage_code(exc), exc):
                    yield ev
                return
        if bool(route([score], threshold)[0]):
            async for ev in self._flagged(answer, score, held, at_end=True):
                yield ev
            return
        m = (await flow.moderate([self.query], [answer], ENDPOINT, known_scores=[score]))[0]
        for ev in self._release(held):
            yield ev
        for ev in self._end(self._finish or "stop", m):
            yield ev

    async def _check(self, answer: str) -> float:
        t = self.clock()
        cost = pair_cost(self.query, answer)
        try:
            if self.admission is not None:  # counted while it runs; an admitted stream is never shed
                with self.admission.admit(cost, force=True):
                    return await self.flow.check(self.query, answer)
            return await self.flow.check(self.query, answer)
        finally:
            self.report.checks += 1
            self.report.inspector_ms += (self.clock() - t) * 1e3
            self.report.holdback_chars = max(self.report.holdback_chars, len(answer) - len(self.report.released))

    async def _flagged(self, answer: str, score: float, held: _Held, at_end: bool = False) -> AsyncIterator[str]:
        """Stop the upstream, let the core decide the final text of the answer so far, send what
        replaces the unreleased remainder."""
        rep = self.report
        rep.cut, rep.flagged_at = True, len(answer)
        await self._close_upstream()
        self.flow.metrics.stream_flag("end" if at_end else "during")
        m = (await self.flow.moderate([self.query], [answer], ENDPOINT, known_scores=[score]))[0]
        final = m.answer
        if final.startswith(rep.released):
            rest = final[len(rep.released):]
        else:
            rest = (CONTINUATION_SEPARATOR if rep.released else "") + final
        held.clear()
        if rest:
            yield self._content_chunk({"content": rest}, None)
        for ev in self._end("content_filter", m):
            yield ev

    async def _failed(self, message: str, type_: str, code: str, exc: Exception | None = None) -> AsyncIterator[str]:
        """Before any event: raise (the ingress answers an HTTP error). After: an error event."""
        await self._close_upstream()
        if type_ == "upstream_error":  # the inspector's failures are counted by ModerationFlow.check
            self.flow.metrics.error("upstream_stream")
        if not self._role_sent:
            if isinstance(exc, StageError):
                raise exc
            raise RequestError(504 if code == "upstream_timeout" else 502, message)
        self.report.error = code
        self._record()
        yield sse(error_payload(message, type_, code))

    # -- chunks ---------------------------------------------------------------------------------
    def _take_meta(self, chunk: dict) -> None:
        for k in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(k) is not None and k not in self._seen:  # the first chunk's, kept
                self._meta[k] = chunk[k]
                self._seen.add(k)
        if chunk.get("usage"):
            self._usage = chunk["usage"]

    def _deltas(self, chunk: dict):
        for ch in chunk.get("choices") or []:
            if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                continue  # n=1 is enforced on the request: another choice is not ours to pass
            if ch.get("finish_reason"):
                self._finish = ch["finish_reason"]
            delta = ch.get("delta")
            if not isinstance(delta, dict):
                continue
            delta = {k: v for k, v in delta.items() if k != "role" and v is not None}
            if isinstance(delta.get("content"), str) and not delta["content"]:
                delta.pop("content")
            if delta:
                yield delta, ch.get("logprobs")

    def _chunk(self, choice: dict) -> dict:
        return {**self._meta, "choices": [choice]}

    def _content_chunk(self, delta: dict, logprobs: Any) -> str:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        if "content" in delta and self.report.ttft_ms is None:
            self.report.ttft_ms = (self.clock() - self.started) * 1e3
        if isinstance(delta.get("content"), str):
            self.report.sent += delta["content"]
        return sse(self._chunk({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}))

    def _release(self, held: _Held):
        if not held.parts:
            return
        now = self.clock()
        self.report.holdback_ms = max(self.report.holdback_ms, (now - held.parts[0][2]) * 1e3)
        for delta, logprobs, _ in held.parts:
            yield self._content_chunk(dict(delta), logprobs)
        self.report.released += held.text
        held.clear()

    def _end(self, finish_reason: str, m: Moderation | None):
        rep = self.report
        rep.finish_reason, rep.moderation = finish_reason, m
        if not self._role_sent:  # an empty answer still starts with the role
            yield self._content_chunk({"content": ""}, None)
        yield sse(self._chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}))
        if m is not None:  # the scoring was the checks': their time, not the core's (it had the score)
            t = dict(m.timings_ms)
            t["inspector_ms"] = round(rep.inspector_ms, 2)
            t["total_ms"] = round(rep.inspector_ms + t.get("aligner_ms", 0.0) + t.get("reinspect_ms", 0.0), 2)
            m.timings_ms = t
            choice = moderation_choice(m, 0, self.settings.expose_original)
        else:
            choice = {"index": 0, "skipped": "no text content to moderate"}
        moderation = {"flagged": bool(choice.get("flagged")), "corrected": bool(choice.get("corrected")),
                      "upstream_ms": round(self.upstream.upstream_ms or 0.0, 2), "choices": [choice],
                      "stream": rep.to_dict()}
        yield sse({**self._meta, "choices": [], "usage": self._usage if not rep.cut else None,
                   "moderation": moderation})
        yield DONE
        self._record()

    def _record(self) -> None:
        rep = self.report
        self.flow.metrics.stream(rep.ttft_ms, rep.holdback_ms, rep.holdback_chars, rep.checks)

    async def _close_upstream(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self.upstream.aclose()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise; it is closed
                pass
