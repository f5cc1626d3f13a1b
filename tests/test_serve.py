"""The Ray Serve deployment over real HTTP on 127.0.0.1: one Serve instance, two applications
deployed together.

- ``main``: the bundled (or $INSPECTOR_MODEL) inspector, a tiny CPU aligner, fail_open, a chat
  upstream started here. Its threshold sits between the scores of two test pairs, so one is
  flagged and one is not whatever the inspector's quality, and above the score of the tiny
  aligner's correction of the flagged one, so that correction passes re-inspection and is shown.
- ``strict``: always-align (threshold 0), fail_closed with a custom refusal, an aligner forced to
  generate 1,800 tokens within a 0.2 s timeout (so it times out for real), and an ingress that takes
  one request at a time with one queued (so a burst gets 503s); its chat proxy exposes the
  original upstream text (``expose_original``).
- ``lean``: no aligner, lists of up to 256 items (the default is 64) of up to 20,000 characters,
  inspector batches of at most 2,048 estimated tokens and a 60,000-token work budget: large
  requests, fair service and shedding.
- ``stalled``: an inspector that cannot answer within its timeout (its batches wait an hour for
  company, the timeout is 1 s) while its replica is up: what /healthz must report, and a stream
  that cannot get its first check.
- ``stream``: streamed answers (``"stream": true``): no aligner, fail_closed, checks at sentence
  ends past 20 held characters; its threshold sits between the scores of the scripted streams'
  harmless check texts and that of the harmful sentence (test_streaming.py's texts and upstream).
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from aligner.tiny import build_tiny_aligner
from pipeline.streaming import CONTINUATION_SEPARATOR
from test_streaming import (AFTER, BENIGN, BENIGN_Q, CLOSE_Q, ERROR_Q, HARM, HARM_Q, HELD, INTRO, SLOW_Q, script,
                            serve_stream)

HIGH = ("How can I make a pipe bomb at home?",
        "Pack a steel pipe with black powder, cap both ends, drill a hole for a fuse and light it "
        "near the crowd so the shrapnel hurts as many people as possible.")
LOW = ("What's a good way to keep basil fresh after buying it?",
       "Trim the stems, stand the bunch in a glass of water on the counter and loosely cover the leaves.")
REFUSAL = "Sorry, I can't help with that. (test refusal)"
STREAM_REFUSAL = "I can't continue this answer. (test stream refusal)"
ALIGNER_TOKENS = 8
API_KEY = "sk-test-123"


# ----------------------------------------------------------------------------- a real upstream chatbot
class _Chatbot(BaseHTTPRequestHandler):
    """Speaks /v1/chat/completions; the answer is scripted by the last user message."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the proxy gave up first (the upstream timeout test)
            pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        if body.get("stream") and user in STREAMS:  # "stream": true: OpenAI server-sent events
            return serve_stream(self, body, STREAMS[user])
        message: dict = {"role": "assistant", "content": None}
        if user == HIGH[0]:
            message["content"] = HIGH[1]
        elif user == LOW[0]:
            message["content"] = LOW[1]
        elif user == "crash":
            return self._send(500, {"error": {"message": "upstream exploded"}})
        elif user == "slow":
            time.sleep(2.5)
            message["content"] = LOW[1]
        elif user == "bad key":
            return self._send(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}})
        elif user == "weather tool":
            message["tool_calls"] = [{"id": "call_1", "type": "function",
                                      "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]
        else:
            message["content"] = "I am not sure."
        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000,
                         "model": body.get("model", "test-model"),
                         "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})


STREAMS = {  # the streamed answers, by the last user message (test_streaming.script)
    HIGH[0]: script(HIGH[1]),
    LOW[0]: script(LOW[1]),
    BENIGN_Q: script(*BENIGN, delay=0.02),
    HARM_Q: script(INTRO, HARM, *AFTER, delay=0.01, tail="trickle", tail_s=5),
    ERROR_Q: script(BENIGN[0], HELD, tail="error"),
    CLOSE_Q: script(BENIGN[0], HELD, tail="close"),
    SLOW_Q: script(*BENIGN, delay=0.01, tail="trickle", tail_s=8),
    "hold": script(tail="trickle", tail_s=3),  # no sentence end: held until 400 characters (~2 s)
}
assert len(STREAMS) == 8, "two scripted streams share a user message"


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Chatbot)
    server.seen, server.streams = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- Serve, started once
@pytest.fixture(scope="module")
def tiny_aligner(tmp_path_factory):
    return build_tiny_aligner(tmp_path_factory.mktemp("serve") / "tiny", "causal", seed=0,
                              max_positions=2048, max_new_tokens=ALIGNER_TOKENS)


@pytest.fixture(scope="module")
def local_pipeline(tiny_aligner):
    """The in-process pipeline over the same models (what ``pipeline.batch`` runs)."""
    from aligner import Aligner
    from inspector import Inspector
    from pipeline.core import ModerationPipeline
    from pipeline.routing import PipelineConfig

    return ModerationPipeline(Inspector.load(), Aligner.load(tiny_aligner, device="cpu"),
                              PipelineConfig(fallback="fail_open", max_new_tokens=ALIGNER_TOKENS))


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_aligner, upstream, local_pipeline):
    from ray import serve

    from pipeline.serve import build_app

    # the main app's threshold sits between the two test pairs' scores
    s_high, s_low = local_pipeline.inspector.score([HIGH[0], LOW[0]], [HIGH[1], LOW[1]])
    assert s_high != s_low, "the inspector gives both test pairs the same score"
    high, low = (HIGH, LOW) if s_high > s_low else (LOW, HIGH)
    s_high, s_low = max(s_high, s_low), min(s_high, s_low)
    # re-inspection counts: the threshold also sits above the correction's score, so it is shown
    fix = local_pipeline.aligner.correct_detailed([high[0]], [high[1]], max_new_tokens=ALIGNER_TOKENS)[0]
    s_fix = float(local_pipeline.inspector.score([high[0]], [fix.text])[0])
    assert fix.ok and s_fix < s_high, "the tiny aligner's correction scores as high as the flagged answer"
    threshold = float(max(s_low, s_fix) + s_high) / 2
    local_pipeline.config.threshold = threshold
    # the stream app's: between its harmless checks (each benign sentence end, the intro, the first
    # sentence of the failing streams) and the harmful one
    insp = local_pipeline.inspector
    harmless = [float(x) for x in insp.score([BENIGN_Q] * 4 + [HARM_Q, ERROR_Q, CLOSE_Q, SLOW_Q],
                                             [*("".join(BENIGN[:k]) for k in range(1, 5)), INTRO, *[BENIGN[0]] * 3])]
    s_harm = float(insp.score([HARM_Q], [INTRO + HARM])[0])
    assert max(harmless) < s_harm, f"the inspector scores a harmless check text {max(harmless):.3f} >= {s_harm:.3f}"
    stream_threshold = (max(harmless) + s_harm) / 2

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    port = serve.context._get_global_client().http_config.port  # the running one's, if already started
    base = f"http://127.0.0.1:{port}"
    small = {"inspector_num_cpus": 0.1, "aligner_num_cpus": 0.1, "ingress_num_cpus": 0.05,
             "aligner_num_gpus": 0, "aligner": str(tiny_aligner), "torch_threads": 1}
    strict = {**small, "threshold": 0.0, "fallback": "fail_closed", "refusal_text": REFUSAL,
              "max_new_tokens": 1800, "generation": {"min_new_tokens": 1800}, "aligner_timeout_s": 0.2,
              "max_ongoing_requests": 1, "max_queued_requests": 1,
              "upstream_url": f"http://127.0.0.1:{upstream.server_port}/v1", "expose_original": True}
    main = {**small, "threshold": threshold, "fallback": "fail_open", "max_new_tokens": ALIGNER_TOKENS,
            "upstream_url": f"http://127.0.0.1:{upstream.server_port}/v1", "upstream_timeout_s": 1.0,
            "max_items": 5, "max_chars": 2000}
    lean = {**small, "aligner": "none", "inspector_timeout_s": 20, "inspector_batch_tokens": 2048,
            "inspector_tokens_per_s": 6000,  # capacity = 6000 x 20 s x 0.5 = 60,000 estimated tokens
            "max_items": 256}  # so the 256-item body meets the token budget, not the item limit
    # batches wait an hour: a 30 s wait let a probe join a batch begun by an earlier test and get
    # its score when that batch flushed (a CI flake), so nothing in this app is ever scored
    stalled = {**small, "aligner": "none", "inspector_batch_wait_s": 3600, "inspector_timeout_s": 1,
               "upstream_url": f"http://127.0.0.1:{upstream.server_port}/v1"}
    stream = {**small, "aligner": "none", "fallback": "fail_closed", "refusal_text": STREAM_REFUSAL,
              "threshold": stream_threshold, "stream_check_chars": 20, "stream_max_holdback_chars": 200,
              "upstream_url": f"http://127.0.0.1:{upstream.server_port}/v1", "upstream_timeout_s": 5}
    serve.run_many([serve.RunTarget(build_app(strict), name="strict", route_prefix="/strict"),
                    serve.RunTarget(build_app(main), name="main", route_prefix="/main"),
                    serve.RunTarget(build_app(lean), name="lean", route_prefix="/lean"),
                    serve.RunTarget(build_app(stalled), name="stalled", route_prefix="/stalled"),
                    serve.RunTarget(build_app(stream), name="stream", route_prefix="/stream")])
    info = {"base": base, "main": f"{base}/main", "strict": f"{base}/strict", "threshold": threshold,
            "flag_pair": high, "pass_pair": low, "lean": f"{base}/lean", "stalled": f"{base}/stalled",
            "stream": f"{base}/stream", "stream_threshold": stream_threshold}
    with httpx.Client(timeout=60) as client:
        info["client"] = client
        yield info
    serve.shutdown()  # deletes both applications


def _pair(p):
    return {"query": p[0], "answer": p[1]}


TIMING_KEYS = {"inspector_ms", "aligner_ms", "reinspect_ms", "total_ms"}


# ----------------------------------------------------------------------------- /healthz and /v1/moderate
def test_healthz_reports_models_and_policy(served):
    h = served["client"].get(served["main"] + "/healthz").json()
    assert h["status"] == "ok"
    assert h["threshold"] == pytest.approx(served["threshold"])
    assert h["fallback"] == "fail_open" and h["chat_proxy"] is True
    assert h["aligner"]["status"] == "ok" and h["aligner"]["device"] == "cpu"
    assert 0 < h["inspector"]["threshold"] < 1


def test_flagged_answer_is_corrected_and_reinspected(served):
    r = served["client"].post(served["main"] + "/v1/moderate", json=_pair(served["flag_pair"]))
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["flagged"] is True and m["score"] >= served["threshold"]
    assert m["corrected"] is True and m["fallback"] is None
    assert m["original_answer"] == served["flag_pair"][1]
    assert m["answer"] == m["corrected_answer"] and m["answer"] != m["original_answer"]
    assert isinstance(m["corrected_score"], float) and 0 <= m["corrected_score"] <= 1
    assert set(m["timings_ms"]) == TIMING_KEYS and m["timings_ms"]["aligner_ms"] > 0


def test_unflagged_answer_passes_untouched(served):
    m = served["client"].post(served["main"] + "/v1/moderate", json=_pair(served["pass_pair"])).json()
    assert m["flagged"] is False and m["score"] < served["threshold"]
    assert m["answer"] == m["original_answer"] == served["pass_pair"][1]
    assert m["corrected"] is False and m["corrected_answer"] is None and m["fallback"] is None


def test_same_results_as_the_in_process_pipeline(served, local_pipeline):
    """The Serve path and ModerationPipeline (what pipeline.batch runs) agree item by item."""
    pairs = [served["flag_pair"], served["pass_pair"]]
    expected = local_pipeline.moderate([q for q, _ in pairs], [a for _, a in pairs])
    got = served["client"].post(served["main"] + "/v1/moderate", json=[_pair(p) for p in pairs]).json()["results"]
    for e, g in zip(expected, got):
        assert g["score"] == pytest.approx(e.score, abs=1e-5)
        assert (g["flagged"], g["corrected"], g["fallback"]) == (e.flagged, e.corrected, e.fallback)
        assert g["answer"] == e.answer
        if e.corrected_score is not None:
            assert g["corrected_score"] == pytest.approx(e.corrected_score, abs=1e-5)


def test_list_keeps_order_and_bad_items_fail_alone(served):
    body = [_pair(served["pass_pair"]), {"query": "Hi"}, 42, {"query": "Hi", "answer": "   "},
            _pair(served["flag_pair"])]
    r = served["client"].post(served["main"] + "/v1/moderate", json=body)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == [0, 1, 2, 3, 4]
    assert "field 'answer' is missing" in res[1]["error"] and res[1]["error"].startswith("item 1:")
    assert "expected an object" in res[2]["error"]
    assert "field 'answer' is empty" in res[3]["error"]
    assert res[0]["flagged"] is False and res[4]["flagged"] is True and res[4]["corrected"] is True
    for x in (res[0], res[4]):
        assert x["flagged"] == (x["score"] >= served["threshold"])


@pytest.mark.parametrize("content, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty request body"),
    (b'"just a string"', 422, "expected a JSON object"),
    (b"[]", 422, "empty list"),
    (json.dumps([{"query": "q", "answer": "a"}] * 6).encode(), 413, "the limit is 5 (max_items)"),
    (b'{"query": "What is 2+2?"}', 422, "field 'answer' is missing"),
    (b'{"query": "What is 2+2?", "answer": 4}', 422, "must be a string"),
    (json.dumps({"query": "q", "answer": "x" * 2001}).encode(), 422, "too long"),
])
def test_malformed_requests_get_clear_4xx(served, content, status, words):
    r = served["client"].post(served["main"] + "/v1/moderate", content=content,
                              headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_server_still_healthy_after_bad_requests(served):
    """Bad requests of its own (not the earlier tests'): each answered, none takes the server down."""
    c, url = served["client"], served["main"] + "/v1/moderate"
    bad = [c.post(url, content=b"{not json"), c.post(url, content=b"[1, NaN]"), c.post(url, json={"query": 3}),
           c.post(url, content=b"[" * 5000 + b"]" * 5000), c.post(url, json=[{"query": "q"}, "x"])]
    assert [r.status_code for r in bad][:4] == [400, 400, 422, 400] and bad[4].status_code == 200
    assert all("error" in item for item in bad[4].json()["results"])
    assert served["client"].get(served["main"] + "/healthz").status_code == 200
    m = served["client"].post(served["main"] + "/v1/moderate", json=_pair(served["pass_pair"])).json()
    assert m["flagged"] is False


# ----------------------------------------------------------------------------- the chat proxy
def _chat(served, user: str, **extra):
    body = {"model": "test-model", "temperature": 0.2,
            "messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": user}], **extra}
    return served["client"].post(served["main"] + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {API_KEY}"})


def test_chat_proxy_forwards_and_passes_a_benign_answer(served, upstream):
    n = len(upstream.seen)
    r = _chat(served, served["pass_pair"][0])
    assert r.status_code == 200, r.text
    out = r.json()
    seen = upstream.seen[n]
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == f"Bearer {API_KEY}"
    assert seen["body"]["model"] == "test-model" and seen["body"]["temperature"] == 0.2
    assert seen["body"]["messages"][1]["content"] == served["pass_pair"][0]
    assert out["object"] == "chat.completion" and out["usage"]["total_tokens"] == 30
    assert out["choices"][0]["message"] == {"role": "assistant", "content": served["pass_pair"][1]}
    mod = out["moderation"]
    assert mod["flagged"] is False and mod["corrected"] is False and mod["upstream_ms"] > 0
    assert mod["choices"][0]["score"] < served["threshold"]


def test_chat_proxy_corrects_a_flagged_answer(served):
    r = _chat(served, served["flag_pair"][0])
    out = r.json()
    c = out["moderation"]["choices"][0]
    assert out["moderation"]["flagged"] is True and c["corrected"] is True
    assert "original_content" not in c and served["flag_pair"][1] not in r.text  # the replaced text: nowhere
    assert out["choices"][0]["message"]["content"] != served["flag_pair"][1]
    assert out["choices"][0]["message"]["role"] == "assistant" and out["choices"][0]["finish_reason"] == "stop"


def test_chat_proxy_exposes_the_original_only_when_configured(served):
    """``strict`` sets expose_original (trusted callers): its refused answer's upstream text comes back."""
    r = served["client"].post(served["strict"] + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": served["flag_pair"][0]}]})
    assert r.status_code == 200, r.text
    out = r.json()
    c = out["moderation"]["choices"][0]
    assert out["choices"][0]["message"]["content"] == REFUSAL and c["fallback"] == "fail_closed"
    assert c["original_content"] == served["flag_pair"][1]


def test_chat_proxy_without_text_content_is_passed_through(served):
    out = _chat(served, "weather tool").json()
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"
    assert "skipped" in out["moderation"]["choices"][0]


@pytest.mark.parametrize("user, extra, status, words", [
    ("crash", {}, 502, "upstream returned 500"),
    ("slow", {}, 504, "upstream timed out"),
    ("hello", {"stream": True, "n": 2}, 400, "stream=true with n=2 is not supported"),
    ("crash", {"stream": True}, 502, "upstream returned 500"),
])
def test_chat_proxy_errors(served, user, extra, status, words):
    r = _chat(served, user, **extra)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_chat_proxy_passes_upstream_client_errors_through(served):
    for extra in ({}, {"stream": True}):
        r = _chat(served, "bad key", **extra)
        assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key"


def test_chat_proxy_rejects_requests_without_a_user_turn(served):
    r = served["client"].post(served["main"] + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 422 and "no 'user' turn" in r.json()["detail"]


# ----------------------------------------------------------------------------- streamed answers
def _sse(served, app: str, user: str, stop_after: int | None = None, **extra):
    """POST a streamed chat request; the response, its events (parsed; "[DONE]" as is) and each
    event's arrival time. ``stop_after``: the client hangs up after that many events."""
    body = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": user}], **extra}
    events, times, t0 = [], [], time.perf_counter()
    with served["client"].stream("POST", served[app] + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r, None, None
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append("[DONE]" if data == "[DONE]" else json.loads(data))
                times.append(time.perf_counter() - t0)
                if stop_after and len(events) >= stop_after:
                    break
    return r, events, times


def _text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def _streamed(upstream, user: str, timeout: float = 6.0) -> dict:
    """The upstream's record of its last stream for ``user``, once it ended or saw the client leave."""
    deadline = time.monotonic() + timeout
    while True:
        rec = [r for r in upstream.streams if r["user"] == user][-1]
        if rec["closed_early"] or rec["finished"] or time.monotonic() > deadline:
            return rec
        time.sleep(0.05)


def test_stream_benign_answer_arrives_in_chunks_equal_to_the_upstream(served, upstream):
    r, events, times = _sse(served, "stream", BENIGN_Q)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert _text(events) == "".join(BENIGN) == _streamed(upstream, BENIGN_Q)["sent"]
    content = [t for e, t in zip(events, times) if isinstance(e, dict) and e.get("choices")
               and e["choices"][0]["delta"].get("content")]
    assert len(content) >= 5
    assert content[-1] - content[0] > 0.2       # released check by check while the upstream streams, not at its end
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    mod = events[-2]["moderation"]
    assert mod["flagged"] is False and mod["choices"][0]["score"] < served["stream_threshold"]
    assert mod["stream"]["checks"] == 4 and mod["stream"]["cut"] is False and mod["stream"]["ttft_ms"] > 0


def test_stream_harmful_sentence_never_reaches_the_client(served, upstream):
    n = len(upstream.streams)
    r, events, _ = _sse(served, "stream", HARM_Q)
    assert r.status_code == 200
    assert _text(events) == INTRO + CONTINUATION_SEPARATOR + STREAM_REFUSAL
    raw = json.dumps(events)
    assert "black powder" not in raw and "walk away" not in raw
    assert [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e.get("choices")
            and e["choices"][0]["finish_reason"]] == ["content_filter"]
    c = events[-2]["moderation"]["choices"][0]
    assert c["flagged"] is True and c["fallback"] == "fail_closed" and c["score"] >= served["stream_threshold"]
    assert events[-2]["moderation"]["stream"]["released_chars"] == len(INTRO) and events[-1] == "[DONE]"
    rec = _streamed(upstream, HARM_Q)
    assert len(upstream.streams) > n and rec["closed_early"] and not rec["finished"]  # the proxy closed it


def test_stream_flagged_at_its_first_check_gets_the_same_answer_as_without_streaming(served):
    """The main app's tiny aligner corrects it through the core: streamed or not, the same text."""
    r, events, _ = _sse(served, "main", served["flag_pair"][0])
    assert r.status_code == 200
    whole = _chat(served, served["flag_pair"][0]).json()
    assert _text(events) == whole["choices"][0]["message"]["content"] != served["flag_pair"][1]
    c = events[-2]["moderation"]["choices"][0]
    assert c["corrected"] is True and c["score"] == pytest.approx(whole["moderation"]["choices"][0]["score"], abs=1e-5)
    assert served["flag_pair"][1] not in json.dumps(events)


@pytest.mark.parametrize("user, code", [(ERROR_Q, "upstream_error"), (CLOSE_Q, "upstream_closed")])
def test_stream_upstream_failure_delivers_what_was_cleared_then_an_error_event(served, user, code):
    r, events, _ = _sse(served, "stream", user)
    assert r.status_code == 200
    assert _text(events) == BENIGN[0] and HELD not in json.dumps(events)
    assert events[-1] != "[DONE]" and events[-1]["error"]["code"] == code


def test_stream_inspector_failure_before_any_text_is_503(served):
    t = time.perf_counter()
    r, _, _ = _sse(served, "stalled", BENIGN_Q)
    assert r.status_code == 503 and "inspector timed out" in r.json()["detail"]
    assert time.perf_counter() - t < 10


def test_stream_client_disconnect_cancels_the_upstream_request(served, upstream):
    t = time.monotonic()
    r, events, _ = _sse(served, "stream", SLOW_Q, stop_after=1)  # the first released text, then hang up
    assert r.status_code == 200 and _text(events)
    rec = _streamed(upstream, SLOW_Q, timeout=10)
    assert rec["closed_early"] and not rec["finished"], rec   # the upstream script runs ~9 s
    assert rec["t_closed"] - t < 6


def test_stream_overload_answers_503_at_once(served):
    """strict: one request in the works, one queued. A stream holds its slot until it ends."""
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hold"}]}

            async def one(delay):
                await asyncio.sleep(delay)
                t = time.perf_counter()
                async with client.stream("POST", served["strict"] + "/v1/chat/completions", json=body) as r:
                    await r.aread()
                    return r.status_code, time.perf_counter() - t
            return await asyncio.gather(one(0), *[one(0.5) for _ in range(6)])

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert codes[0] == 200 and codes.count(503) >= 4, codes
    assert max(t for c, t in results if c == 503) < 2.0, results


def test_stream_with_the_official_openai_client(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["stream"] + "/v1", api_key="sk-test", max_retries=0)
    stream = client.chat.completions.create(model="test-model", stream=True,
                                            messages=[{"role": "user", "content": BENIGN_Q}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(BENIGN)
    last = chunks[-1].to_dict()  # newer clients type a "moderation" field of their own: read it as sent
    assert chunks[-1].choices == [] and last["moderation"]["flagged"] is False
    assert last["moderation"]["stream"]["checks"] == 4 and 0 <= last["moderation"]["choices"][0]["score"] <= 1
    with pytest.raises(openai.APIError, match="the model server crashed"):
        list(client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": ERROR_Q}]))


# ----------------------------------------------------------------------------- failure policy, backpressure
def test_aligner_timeout_applies_fail_closed(served):
    r = served["client"].post(served["strict"] + "/v1/moderate", json=_pair(LOW))
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["flagged"] is True  # threshold 0: always align
    assert m["fallback"] == "fail_closed" and m["corrected"] is False
    assert m["answer"] == REFUSAL and m["original_answer"] == LOW[1]
    assert "timed out" in m["problem"]
    assert m["timings_ms"]["aligner_ms"] < 5000


def test_overload_answers_503_quickly(served):
    """One request in the works, one queued: the rest of a burst is refused at once."""
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one():
                t = time.perf_counter()
                r = await client.post(served["strict"] + "/v1/moderate", json=_pair(LOW))
                return r.status_code, time.perf_counter() - t
            return await asyncio.gather(*[one() for _ in range(8)])

    results = asyncio.run(burst())
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 3 and codes.count(200) >= 1, codes
    assert max(t for c, t in results if c == 503) < 5.0


# ----------------------------------------------------------------------------- metrics
def _metric_total(text: str, name: str, **tags) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_move(served, ray_cluster):
    """Ray exports the ingress's counters for Prometheus on the node's metrics port."""
    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    # its own traffic, so the test holds when run alone: a flagged and a bad pair, a malformed body,
    # a chat request, and an always-align request whose aligner times out (strict app)
    c = served["client"]
    assert c.post(served["main"] + "/v1/moderate", json=_pair(served["flag_pair"])).status_code == 200
    assert c.post(served["main"] + "/v1/moderate", json={"query": 3}).status_code == 422
    assert c.post(served["main"] + "/v1/moderate", content=b"{not json").status_code == 400
    assert _chat(served, served["pass_pair"][0]).status_code == 200
    assert c.post(served["strict"] + "/v1/moderate", json=_pair(LOW)).status_code == 200
    assert _sse(served, "stream", HARM_Q)[0].status_code == 200  # a stream cut by a flag mid-way
    deadline, text = time.monotonic() + 45, ""
    wanted = [("ray_moderation_requests_total", {"application": "main", "endpoint": "moderate", "status": "200"}),
              ("ray_moderation_requests_total", {"application": "main", "status": "422"}),
              ("ray_moderation_pairs_total", {"application": "main", "endpoint": "chat"}),
              ("ray_moderation_flagged_total", {"application": "main", "endpoint": "moderate"}),
              ("ray_moderation_corrected_total", {"application": "main"}),
              ("ray_moderation_fallbacks_total", {"application": "strict", "reason": "timeout",
                                                  "policy": "fail_closed"}),
              ("ray_moderation_errors_total", {"application": "main", "stage": "bad_request"}),
              ("ray_moderation_inspector_latency_ms_count", {"application": "main"}),
              ("ray_moderation_aligner_latency_ms_count", {"application": "main"}),
              ("ray_moderation_requests_total", {"application": "stream", "endpoint": "chat_stream",
                                                 "status": "200"}),
              ("ray_moderation_stream_checks_total", {"application": "stream"}),
              ("ray_moderation_stream_flags_total", {"application": "stream", "when": "during"}),
              ("ray_moderation_stream_ttft_ms_count", {"application": "stream"}),
              ("ray_moderation_stream_holdback_chars_count", {"application": "stream"})]
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(_metric_total(text, n, **t) > 0 for n, t in wanted):
            break
        time.sleep(2)
    missing = [(n, t) for n, t in wanted if _metric_total(text, n, **t) <= 0]
    assert not missing, f"metrics not exported: {missing}"
    share = [float(x) for x in re.findall(r'^ray_moderation_flagged_share\{[^}]*application="strict"[^}]*\} (\S+)',
                                          text, re.M)]
    assert share and share[0] == pytest.approx(1.0)  # always-align: every pair paid the aligner


# ----------------------------------------------------------------------------- work budgets, fairness, health
# tagged with different letters, so that no text repeats back to back (the inspector reads such repeats
# once, digits and punctuation aside: cheap)
LONG_ANSWER = " ".join(f"Day {tag}: to keep a sourdough starter healthy, feed it flour and water at the same time "
                       "each day, keep it somewhere warm, and discard half before each feeding so it never runs "
                       "out of food." for tag in (a + b for a in "abcd" for b in "klmnopqrst"))


def _heavy(n: int, chars: int = 6000) -> list[dict]:
    return [{"query": f"How do I look after a sourdough starter? ({i})", "answer": LONG_ANSWER[:chars]}
            for i in range(n)]


def test_a_large_request_does_not_stall_the_others(served):
    """A large list is scored in slices of at most inspector_batch_tokens, two at a time: small
    requests sent meanwhile are served between its slices instead of after all of it."""
    url = served["lean"] + "/v1/moderate"

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            await client.post(url, json=_pair(LOW))  # warm
            t0 = time.perf_counter()
            heavy = asyncio.create_task(client.post(url, json=_heavy(16)))
            await asyncio.sleep(0.5)
            small = []
            while not heavy.done() and len(small) < 8:
                t = time.perf_counter()
                r = await client.post(url, json=_pair(LOW))
                small.append((r.status_code, time.perf_counter() - t))
            r = await heavy
            return r, time.perf_counter() - t0, small

    r, heavy_s, small = asyncio.run(run())
    assert r.status_code == 200 and len(r.json()["results"]) == 16, r.text[:300]
    assert heavy_s > 2.0, f"the large request took {heavy_s:.1f} s: too little to tell"
    assert small and all(code == 200 for code, _ in small), small
    assert max(t for _, t in small) < heavy_s / 2, (heavy_s, small)


def test_a_request_above_the_work_budget_is_refused_at_once(served):
    """The issue's body, 256 items with 20,000-character answers (~4.4 MB), is far above the budget."""
    body = [{"query": "q" * 1000, "answer": "a" * 16000}] * 255 + [{"query": "q", "answer": "a" * 20000}]
    t = time.perf_counter()
    r = served["client"].post(served["lean"] + "/v1/moderate", json=body, timeout=30)
    assert r.status_code == 413, r.text[:300]
    assert "limit per request is 60000" in r.json()["detail"] and time.perf_counter() - t < 15
    t = time.perf_counter()
    ok = served["client"].post(served["lean"] + "/v1/moderate", json=_pair(LOW), timeout=30)
    assert ok.status_code == 200 and time.perf_counter() - t < 5


def test_overload_is_shed_at_once_not_queued_to_time_out(served):
    """Ten concurrent requests of ~41,000 estimated tokens each against a 60,000-token budget:
    one is admitted and answered, the others get 503 with Retry-After at once."""
    url = served["lean"] + "/v1/moderate"

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one():
                t = time.perf_counter()
                r = await client.post(url, json=_heavy(16))
                return r, time.perf_counter() - t
            return await asyncio.gather(*[one() for _ in range(10)])

    results = asyncio.run(burst())
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 7, codes
    shed = [(r, t) for r, t in results if r.status_code == 503]
    assert all("overloaded" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1 for r, _ in shed)
    assert max(t for _, t in shed) < 3.0, [round(t, 2) for _, t in shed]


def test_healthz_is_503_when_the_inspector_cannot_answer(served):
    """The stalled app's inspector replica is up (its info() answers) but scores nothing in time."""
    t = time.perf_counter()
    r = served["client"].get(served["stalled"] + "/healthz")
    assert r.status_code == 503, r.text
    assert "inspector not answering" in r.json()["detail"] and "probe" in r.json()["detail"]
    assert time.perf_counter() - t < 10
    h = served["client"].get(served["main"] + "/healthz").json()  # a working one reports its probe
    assert h["status"] == "ok" and h["inspector"]["probe_ms"] > 0 and h["inspector"]["recent"]["calls"] >= 0
