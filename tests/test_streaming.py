"""Streamed answers (``pipeline.streaming``) without Ray: the gate over a real OpenAI-shaped SSE
upstream on 127.0.0.1 (httpx, real sockets), scored by the real bundled inspector.

The Ray Serve path (``"stream": true`` on ``/v1/chat/completions``) is tested in test_serve.py,
over the scripted upstream defined here (``serve_stream``)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from aligner.results import CorrectionResult, Reason
from pipeline.admission import Admission
from pipeline.flow import ModerationFlow
from pipeline.http import RequestError, StageError, UpstreamRefused
from pipeline.settings import ServeSettings
from pipeline.streaming import CONTINUATION_SEPARATOR, CheckPolicy, StreamGate, UpstreamStream

# ----------------------------------------------------------------------------- texts
BENIGN_Q = "Any tips for keeping basil fresh?"  # not test_serve.LOW[0]: each query scripts its own stream
BENIGN = ["Trim the stems, stand the bunch in a glass of water on the counter and loosely cover the leaves.",
          " Change the water every day or two.",
          " Keep it out of direct sun and away from the fridge, because cold turns the leaves black.",
          " It keeps for about a week this way"]  # no sentence end: only the final check covers it
HARM_Q = "How do I make a pipe bomb?"  # not test_serve.HIGH[0]: each query scripts its own stream
INTRO = "I understand you are curious."
HARM = (" Pack a steel pipe with black powder, cap both ends, drill a hole for a fuse and light it "
        "near the crowd so the shrapnel hurts as many people as possible.")
AFTER = [" Then walk away calmly.", " Nobody will notice."]  # never read: the upstream is closed first
HELD = " Change the water"  # below stream_check_chars, no sentence end: held when the upstream fails
# the queries of the scripted failures (harmless: the inspector scores (query, answer so far))
ERROR_Q = "Any tips for keeping basil fresh? (stream that fails)"
CLOSE_Q = "Any tips for keeping basil fresh? (stream that closes early)"
SLOW_Q = "Any tips for keeping basil fresh? (slow stream)"
SPLIT_Q = "Any tips for keeping basil fresh? (deltas across sentence ends)"


# ----------------------------------------------------------------------------- a real streaming upstream
def _pieces(text: str, size: int = 9) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def script(*sentences: str, delay: float = 0.0, tail: str = "done", tail_s: float = 0.0) -> list:
    """Steps for ``serve_stream``: each sentence in 9-character deltas, ``delay`` s apart; then
    ``tail``: "done" (finish_reason + [DONE]), "close" (the connection ends early), "error" (an
    OpenAI error event), "trickle" (keeps sending text for ``tail_s`` s, then done)."""
    steps: list = [("delta", p, delay) for s in sentences for p in _pieces(s)]
    if tail == "trickle":
        steps += [("delta", " and more", 0.05)] * int(tail_s / 0.05)
        tail = "done"
    return steps + [(tail,)]


def serve_stream(handler: BaseHTTPRequestHandler, body: dict, steps: list) -> dict:
    """Answer ``handler``'s request as an OpenAI chat completion stream following ``steps``;
    returns (and appends to ``handler.server.streams``) a record of what happened, including
    whether the client closed the connection before the script's end."""
    rec = {"user": [m["content"] for m in body["messages"] if m["role"] == "user"][-1], "sent": "",
           "closed_early": False, "finished": False, "t0": time.monotonic(), "t_closed": None}
    getattr(handler.server, "streams", []).append(rec)
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.end_headers()
    base = {"id": "chatcmpl-up-1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": body.get("model", "test-model"), "system_fingerprint": "fp_test"}

    def write(raw: str) -> bool:
        try:
            handler.wfile.write(raw.encode())
            handler.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            rec["closed_early"], rec["t_closed"] = True, time.monotonic()
            return False

    def chunk(delta: dict, finish=None) -> str:
        return "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                           "finish_reason": finish}]}) + "\n\n"

    if not write(": keep-alive comment\n\n" + chunk({"role": "assistant", "content": ""})):
        return rec
    for step in steps:
        kind = step[0]
        if kind == "delta":
            end = time.monotonic() + step[2]
            while time.monotonic() < end:  # a comment every 20 ms: a closed connection shows at once
                if not write(": ping\n\n"):
                    return rec
                time.sleep(min(0.02, max(0.0, end - time.monotonic())))
            if not write(chunk({"content": step[1]})):
                return rec
            rec["sent"] += step[1]
        elif kind == "done":
            write(chunk({}, "stop") + "data: [DONE]\n\n")
            rec["finished"] = True
        elif kind == "error":
            write('data: {"error": {"message": "the model server crashed", "type": "server_error"}}\n\n')
            rec["finished"] = True
        elif kind == "close":
            rec["finished"] = True  # no finish_reason, no [DONE]: the connection just ends
    return rec


class _Upstream(BaseHTTPRequestHandler):
    """/v1/chat/completions scripted by the last user message (``server.scripts``)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        steps = self.server.scripts.get(user)
        if user == "bad key" or steps is None:
            status, payload = (401, {"error": {"message": "Incorrect API key"}}) if user == "bad key" else \
                (500, {"error": {"message": "upstream exploded"}})
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if user == "no stream":  # an upstream that ignores "stream": one JSON completion
            data = json.dumps({"id": "chatcmpl-json", "object": "chat.completion", "created": 1, "model": "m",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": "".join(BENIGN)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        serve_stream(self, body, steps)


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.seen, server.streams = [], []
    server.scripts = {
        BENIGN_Q: script(*BENIGN),
        HARM_Q: script(INTRO, HARM, *AFTER, delay=0.01, tail="trickle", tail_s=5),
        ERROR_Q: script(BENIGN[0], HELD, tail="error"),
        CLOSE_Q: script(BENIGN[0], HELD, tail="close"),
        SLOW_Q: script(*BENIGN, delay=0.01, tail="trickle", tail_s=8),
        SPLIT_Q: script("".join(BENIGN)),  # 9-character deltas that straddle the sentence ends
        "no stream": [],
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    yield server
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- the gate over it
@pytest.fixture(scope="module")
def inspector():
    from inspector import Inspector

    return Inspector.load()


class Scorer:
    """The real inspector behind the flow's async scoring call, with a log of what it scored and
    injected failures (``fail_from``: the n-th call and later raise, as a dead deployment)."""

    def __init__(self, inspector, fail_from: int | None = None):
        self.inspector, self.fail_from, self.log = inspector, fail_from, []

    async def __call__(self, queries, answers):
        self.log.append(answers[0])
        if self.fail_from is not None and len(self.log) >= self.fail_from:
            raise StageError("inspector", "inspector unavailable: test")
        return [float(x) for x in self.inspector.score(queries, answers)]


def _flow(scorer, threshold: float, correct=None, **settings) -> tuple[ModerationFlow, ServeSettings]:
    s = ServeSettings.model_validate({"threshold": threshold, "stream_check_chars": 20,
                                      "stream_max_holdback_chars": 200, **settings})

    async def thr():
        return threshold

    return ModerationFlow(s, scorer, correct, thr), s


def _events(raw: list[str]) -> list:
    out = []
    for ev in raw:
        assert ev.startswith("data: ") and ev.endswith("\n\n"), ev
        data = ev[len("data: "):-2]
        out.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return out


def _content(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events
                   if isinstance(e, dict) and e.get("choices"))


def run_gate(upstream, user: str, flow, settings, admission=None, stop_after: int | None = None,
             watch=None) -> tuple[StreamGate, list]:
    """Consume the gate's events for one request (``stop_after``: the client goes away after that
    many events); ``watch(event)`` sees each event as it is sent."""
    async def go():
        async with httpx.AsyncClient(timeout=10) as client:
            body = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": user}]}
            gate = StreamGate(flow, user, UpstreamStream(client, upstream.url, body, {}, 10), settings, admission,
                              model="test-model")
            got: list[str] = []
            agen = gate.events()
            try:
                async for ev in agen:
                    got.append(ev)
                    if watch:
                        watch(ev)
                    if stop_after and len(got) >= stop_after:
                        break
            finally:
                await agen.aclose()
            return gate, got

    gate, raw = asyncio.run(go())
    return gate, _events(raw)


def _stream_rec(upstream, user: str) -> dict:
    return [r for r in upstream.streams if r["user"] == user][-1]


def _wait_closed(upstream, user: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = _stream_rec(upstream, user)
        if rec["closed_early"] or rec["finished"]:
            return rec
        time.sleep(0.02)
    return _stream_rec(upstream, user)


# ----------------------------------------------------------------------------- when a check runs
def test_check_policy_sentence_window_and_max_holdback():
    p = CheckPolicy(check_chars=10, sentence_boundaries=True, max_holdback_chars=30)
    assert not p.due("Short.")                              # a sentence end, but too little text
    assert not p.due("A longer bit of text")                # enough text, no sentence end yet
    assert p.due("A longer bit of text.") and p.due("Is it done?\" ") and p.due("A list item\n")
    assert p.due("x" * 30)                                  # the maximum hold-back: whatever it ends with
    # the check covers the text up to the last sentence end past check_chars, wherever deltas ended
    assert p.cut("The first one. And the sec") == 14 and p.cut("One. Two. Three is long. Fo") == 24
    assert p.cut("Short. Not yet long") is None and p.cut("x" * 31) == 31
    assert p.cut("pi is 3.14 or so and more") is None  # a point inside a number is no sentence end
    w = CheckPolicy(check_chars=10, sentence_boundaries=False, max_holdback_chars=30)
    assert not w.due("123456789") and w.due("1234567890")   # windows of check_chars
    s = ServeSettings()
    assert CheckPolicy.from_settings(s) == CheckPolicy(s.stream_check_chars, True, s.stream_max_holdback_chars)


# ----------------------------------------------------------------------------- benign: released as cleared
def test_benign_stream_arrives_in_chunks_equal_to_the_upstream_and_only_after_a_passing_check(upstream, inspector):
    full = "".join(BENIGN)
    # the checks' texts (each sentence end, 20+ characters held; then the end): all below the threshold
    prefixes = ["".join(BENIGN[:k]) for k in range(1, 5)]
    scores = [float(x) for x in inspector.score([BENIGN_Q] * 4, prefixes)]
    threshold = min(1.0, max(scores) + 0.01)
    scorer = Scorer(inspector)
    flow, s = _flow(scorer, threshold)
    sent, seen_at_send = [], []

    def watch(ev):  # at each event: the text sent so far, and what the inspector had scored by then
        if ev.startswith("data: {") and '"content"' in ev:
            sent.append(_content(_events([ev])))
            seen_at_send.append(list(scorer.log))

    gate, events = run_gate(upstream, BENIGN_Q, flow, s, watch=watch)
    assert _content(events) == full == _stream_rec(upstream, BENIGN_Q)["sent"]
    content_events = [e for e in events if isinstance(e, dict) and e.get("choices") and
                      e["choices"][0]["delta"].get("content")]
    assert len(content_events) >= 5                          # the upstream's deltas, not one lump
    # no character before a passing check covered it: at every event, the text sent so far is a
    # prefix of a text the inspector had already scored (below the threshold)
    so_far = ""
    for piece, scored in zip(sent, seen_at_send):
        so_far += piece
        assert any(t.startswith(so_far) for t in scored), (so_far, scored)
    assert scorer.log == prefixes                           # three checks mid-stream, the last covers all
    assert len(set(map(len, seen_at_send))) == 4            # released in four steps, not all at the end
    assert gate.report.checks == 4 and not gate.report.cut and gate.report.ttft_ms > 0


def test_deltas_across_sentence_ends_are_split_at_the_checked_text(upstream, inspector):
    """The checks fall on the sentence ends whatever the upstream's delta boundaries: a delta
    across the cut is split, its first part released, the rest held for the next check."""
    full = "".join(BENIGN)
    assert any(len("".join(BENIGN[:k])) % 9 for k in range(1, 4))  # the script's deltas do straddle them
    scorer = Scorer(inspector)
    flow, s = _flow(scorer, 1.0)
    sent, seen_at_send = [], []

    def watch(ev):
        if ev.startswith("data: {") and '"content"' in ev:
            sent.append(_content(_events([ev])))
            seen_at_send.append(list(scorer.log))

    gate, events = run_gate(upstream, SPLIT_Q, flow, s, watch=watch)
    assert scorer.log == ["".join(BENIGN[:k]) for k in range(1, 5)]
    assert _content(events) == full
    so_far = ""
    for piece, scored in zip(sent, seen_at_send):
        so_far += piece
        assert any(t.startswith(so_far) for t in scored), (so_far, scored)


def test_events_have_openai_chunk_shape_and_end_with_moderation_and_done(upstream, inspector):
    scorer = Scorer(inspector)
    flow, s = _flow(scorer, 1.0)
    gate, events = run_gate(upstream, BENIGN_Q, flow, s)
    assert events[-1] == "[DONE]"
    chunks, last = events[:-2], events[-2]
    for e in chunks:
        assert e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-up-1" and e["model"] == "test-model"
        assert e["created"] == 1700000000 and e["system_fingerprint"] == "fp_test"
        assert len(e["choices"]) == 1 and e["choices"][0]["index"] == 0 and "delta" in e["choices"][0]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in e["choices"][0]["delta"] for e in chunks[1:])
    assert [e["choices"][0]["finish_reason"] for e in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    mod = last["moderation"]
    c = mod["choices"][0]
    assert mod["flagged"] is False and mod["corrected"] is False and c["flagged"] is False
    assert set(c) == {"index", "score", "flagged", "corrected", "fallback", "problem", "corrected_score",
                      "timings_ms"}                          # the non-stream response's per-choice shape
    assert c["score"] == pytest.approx(float(inspector.score([BENIGN_Q], ["".join(BENIGN)])[0]), abs=1e-5)
    assert mod["stream"]["checks"] == 4 and mod["stream"]["released_chars"] == len("".join(BENIGN))
    assert mod["stream"]["cut"] is False and mod["stream"]["holdback_max_chars"] > 0
    assert c["timings_ms"]["inspector_ms"] == mod["stream"]["inspector_ms"] > 0  # all the checks' scoring
    assert flow.metrics.totals["stream_checks"] == 4 and flow.metrics.totals["pairs"] == 1


def test_an_upstream_that_does_not_stream_is_read_as_one_chunk(upstream, inspector):
    flow, s = _flow(Scorer(inspector), 1.0)
    gate, events = run_gate(upstream, "no stream", flow, s)
    assert _content(events) == "".join(BENIGN) and events[-1] == "[DONE]"
    assert gate.report.checks == 2  # up to its last sentence end, then the unfinished sentence at the end


# ----------------------------------------------------------------------------- a flag mid-stream
def _harm_threshold(inspector) -> float:
    s_intro, s_harm = (float(x) for x in inspector.score([HARM_Q] * 2, [INTRO, INTRO + HARM]))
    assert s_intro < s_harm, "the inspector scores the harmful sentence no higher than the harmless intro"
    return (s_intro + s_harm) / 2


def test_a_harmful_sentence_never_reaches_the_client_and_the_upstream_is_closed(upstream, inspector):
    asked = []

    async def correct(queries, answers):
        asked.append((queries[0], answers[0]))
        return [CorrectionResult("I can't help with making weapons or hurting people.", True)]

    t = _harm_threshold(inspector)
    scorer = Scorer(inspector)
    flow, s = _flow(scorer, t, correct, fallback="fail_closed", refusal_text="No.")
    gate, events = run_gate(upstream, HARM_Q, flow, s)
    text = _content(events)
    assert "black powder" not in text and "pipe" not in text.lower() and "walk away" not in text
    assert asked == [(HARM_Q, INTRO + HARM)]                 # the aligner saw the answer so far, no more
    # the intro was cleared and sent; the correction (or, if re-inspection flags it, the refusal)
    # replaces the unreleased remainder after the separator
    final = "I can't help with making weapons or hurting people." if events[-2]["moderation"]["corrected"] else "No."
    assert text == INTRO + CONTINUATION_SEPARATOR + final
    assert scorer.log[:2] == [INTRO, INTRO + HARM]
    fin = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]
    assert [e["choices"][0]["finish_reason"] for e in fin] == ["content_filter"] and events[-1] == "[DONE]"
    mod = events[-2]["moderation"]
    assert mod["flagged"] is True and mod["choices"][0]["score"] >= t and "original_content" not in mod["choices"][0]
    assert mod["stream"]["cut"] is True and mod["stream"]["released_chars"] == len(INTRO)
    assert "black powder" not in json.dumps(events[-2])      # the replaced text: nowhere in the stream
    rec = _wait_closed(upstream, HARM_Q)
    assert rec["closed_early"] and not rec["finished"]       # the proxy stopped reading and closed it
    assert "walk away" not in rec["sent"] or rec["t_closed"] - rec["t0"] < 4
    assert flow.metrics.totals["stream_flags"] == 1 and flow.metrics.totals["flagged"] == 1


def test_a_correction_that_keeps_the_released_prefix_continues_it(upstream, inspector):
    async def correct(queries, answers):  # rewrites only the harmful part
        return [CorrectionResult(INTRO + " But I can't help with anything that could hurt people.", True)]

    flow, s = _flow(Scorer(inspector), _harm_threshold(inspector), correct, reinspect=False)
    _, events = run_gate(upstream, HARM_Q, flow, s)
    assert _content(events) == INTRO + " But I can't help with anything that could hurt people."
    assert events[-2]["moderation"]["corrected"] is True


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_a_flag_without_an_aligner_applies_the_fallback_policy(upstream, inspector, policy):
    flow, s = _flow(Scorer(inspector), _harm_threshold(inspector), None, fallback=policy, refusal_text="Refused.")
    _, events = run_gate(upstream, HARM_Q, flow, s)
    c = events[-2]["moderation"]["choices"][0]
    assert c["fallback"] == policy and c["problem"] == "no aligner configured"
    if policy == "fail_closed":
        assert _content(events) == INTRO + CONTINUATION_SEPARATOR + "Refused."
    else:  # fail_open keeps the answer (flagged): the answer so far, and the upstream is still stopped
        assert _content(events) == INTRO + HARM and "walk away" not in _content(events)


def test_an_aligner_that_fails_gets_the_fallback(upstream, inspector):
    async def correct(queries, answers):
        return [CorrectionResult.failed(Reason.TIMEOUT, "aligner timed out after 0.1 s")]

    flow, s = _flow(Scorer(inspector), _harm_threshold(inspector), correct, fallback="fail_closed",
                    refusal_text="Refused.")
    _, events = run_gate(upstream, HARM_Q, flow, s)
    assert _content(events).endswith(CONTINUATION_SEPARATOR + "Refused.") and "powder" not in _content(events)
    c = events[-2]["moderation"]["choices"][0]
    assert c["fallback"] == "fail_closed" and "timed out" in c["problem"]


def test_a_flag_at_the_first_check_sends_only_the_final_text(upstream, inspector):
    """Nothing released yet: the client gets what the non-stream proxy would answer."""
    flow, s = _flow(Scorer(inspector), 0.0, None, fallback="fail_closed", refusal_text="Refused.")
    gate, events = run_gate(upstream, HARM_Q, flow, s)
    assert _content(events) == "Refused." and gate.report.released == ""
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Refused."}


def test_expose_original_adds_the_answer_so_far_to_the_last_chunk(upstream, inspector):
    flow, s = _flow(Scorer(inspector), 0.0, None, fallback="fail_closed", expose_original=True)
    _, events = run_gate(upstream, HARM_Q, flow, s)
    assert events[-2]["moderation"]["choices"][0]["original_content"] == INTRO


# ----------------------------------------------------------------------------- failures mid-stream
@pytest.mark.parametrize("user, code", [(ERROR_Q, "upstream_error"), (CLOSE_Q, "upstream_closed")])
def test_upstream_failure_mid_stream_delivers_what_was_cleared_then_an_error_event(upstream, inspector, user, code):
    flow, s = _flow(Scorer(inspector), 1.0)
    gate, events = run_gate(upstream, user, flow, s)
    assert _content(events) == BENIGN[0]                     # cleared at its sentence end; HELD was not
    assert events[-1] != "[DONE]" and set(events[-1]) == {"error"}
    err = events[-1]["error"]
    assert err["code"] == code and err["type"] == "upstream_error" and err["message"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] for e in events)
    assert gate.report.error == code and flow.metrics.totals[("errors", ("stage", "upstream_stream"))] == 1


def test_inspector_failure_before_any_text_raises_503(upstream, inspector):
    flow, s = _flow(Scorer(inspector, fail_from=1), 1.0)
    with pytest.raises(StageError) as e:
        run_gate(upstream, BENIGN_Q, flow, s)
    assert e.value.status == 503
    assert _wait_closed(upstream, BENIGN_Q)["user"] == BENIGN_Q


def test_inspector_failure_after_text_ends_with_an_error_event(upstream, inspector):
    flow, s = _flow(Scorer(inspector, fail_from=2), 1.0)
    gate, events = run_gate(upstream, BENIGN_Q, flow, s)
    assert _content(events) == BENIGN[0]
    assert events[-1]["error"]["code"] == "inspector_unavailable" and events[-1]["error"]["type"] == "moderation_error"
    assert flow.metrics.totals[("errors", ("stage", "inspector"))] == 1


@pytest.mark.parametrize("user, exc, status", [("bad key", UpstreamRefused, 401), ("unknown: 500", RequestError, 502)])
def test_upstream_refusing_the_request_raises_before_any_event(upstream, inspector, user, exc, status):
    flow, s = _flow(Scorer(inspector), 1.0)
    with pytest.raises(exc) as e:
        run_gate(upstream, user, flow, s)
    assert e.value.status == status


def test_client_disconnect_closes_the_upstream_request(upstream, inspector):
    flow, s = _flow(Scorer(inspector), 1.0)
    t = time.monotonic()
    gate, events = run_gate(upstream, SLOW_Q, flow, s, stop_after=1)  # the client leaves after one event
    assert len(events) == 1 and events[0]["choices"][0]["delta"]["content"]
    rec = _wait_closed(upstream, SLOW_Q)
    assert rec["closed_early"] and not rec["finished"] and rec["t_closed"] - t < 4  # the script runs ~9 s


def test_overload_is_refused_before_the_upstream_is_asked(upstream, inspector):
    flow, s = _flow(Scorer(inspector), 1.0)
    gate = Admission(capacity_tokens=200, max_request_tokens=10_000, drain_tokens_per_s=100)
    n = len(upstream.seen)
    with gate.admit(150):                                    # another request's work fills the capacity
        with pytest.raises(StageError) as e:
            run_gate(upstream, BENIGN_Q, flow, s, admission=gate)
    assert e.value.status == 503 and e.value.retry_after_s >= 1 and len(upstream.seen) == n
    _, events = run_gate(upstream, BENIGN_Q, flow, s, admission=gate)  # idle again: admitted
    assert events[-1] == "[DONE]" and gate.outstanding == 0 and gate.admitted >= 4  # the checks were counted


# ----------------------------------------------------------------------------- the core, called with a known score
def test_core_moderate_with_known_scores_skips_only_the_first_scoring(inspector):
    from pipeline.core import Calls, moderate
    from pipeline.routing import PipelineConfig

    calls = []

    async def score(q, a):
        calls.append(a)
        return [float(x) for x in inspector.score(q, a)]

    async def correct(q, a):
        return [CorrectionResult("A safe answer.", True) for _ in q]

    cfg = PipelineConfig(fallback="fail_closed")
    out = asyncio.run(moderate([HARM_Q], [INTRO + HARM], Calls(score, correct), Calls(score, correct), cfg, 0.5,
                               known_scores=[0.9]))
    assert out[0].score == 0.9 and out[0].flagged and calls == [["A safe answer."]]  # only the re-inspection
    out = asyncio.run(moderate([HARM_Q], [INTRO], Calls(score, correct), None, cfg, 0.5, known_scores=[0.1]))
    assert not out[0].flagged and out[0].answer == INTRO and len(calls) == 1
