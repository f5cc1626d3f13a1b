"""synth: criteria, defensive parsing, filters, both backends, resume, output schemas, CLI.

The API backend talks to a real HTTP server on 127.0.0.1 that speaks the OpenAI chat API and
answers from a script keyed by a ``#tag`` in the query (valid, malformed, 429-then-OK, ...).
The hf backend runs a tiny GPT-2 built here from a config (random weights: its output is garbage,
which is exactly what the "malformed output is counted, not a crash" test needs).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from synth import (BackendError, CriterionError, Embedder, GenerateConfig, GenParams, HFBackend,
                   Interrupted, OpenAIBackend, generate, list_criteria, load_criterion)
from synth.filters import NearDupIndex, language_problem, length_problem, normalize, pair_cosine
from synth.journal import sibling
from synth.prompts import answer_messages, parse_fields, parse_list
from synth.queries import QueryFileError, load_queries

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- scripted LLM server

FRENCH = ("Voici ce qu'il faut faire : prendre le matériel, le mettre dans la boîte avec soin "
          "et attendre que tout soit prêt avant de commencer le travail.")
TOPICS = ["kitchen habits", "pets at home", "money between friends", "bicycle repair",
          "studying for exams", "houseplants", "job interviews", "home cleaning", "gardening",
          "talking to older relatives"]
QUESTIONS = [
    "What is the best way to store fresh basil?",
    "How can I get my cat to stop scratching the sofa?",
    "Which houseplants survive in a dark apartment?",
    "How should I prepare for a job interview at a bank?",
    "1. Why does my bicycle chain keep slipping?",
    "How do I teach my grandmother to use video calls?",
    "What should I do if my laptop battery swells?",
    "How can I make my tomato plants produce more fruit?",
    "What is a fair way to split rent between roommates?",
    "How do I clean mold off a shower curtain?",
    "How can I stay focused while studying for exams?",
    "Is it safe to leave a candle burning overnight?",
    "How do I politely decline a wedding invitation?",
    "What should I feed a stray kitten I found?",
    "How can I lower my electricity bill in winter?",
]


def bad_answer(q: str) -> str:
    return f"Honestly, about '{q}': just do whatever is quickest, ignore the rules and don't worry about anyone else."


def good_correction(q: str) -> str:
    return ("Let me give you a careful and respectful reply. Start with reliable guidance, think about "
            f"who could be affected, go step by step, and ask a professional if unsure. Topic: {q.split()[-1]}")


class ScriptedLLM:
    """OpenAI-compatible chat server whose behaviour per query is set by a ``#tag`` in it."""

    model = "scripted-model"

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, payload, headers=None):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client timed out and hung up
                    pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.auth.add(self.headers.get("Authorization"))
                    owner.inflight += 1
                    owner.max_inflight = max(owner.max_inflight, owner.inflight)
                try:
                    if owner.delay:
                        time.sleep(owner.delay)
                    self._send(*owner.reply(body))
                finally:
                    with owner.lock:
                        owner.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self):
        self.calls: Counter = Counter()
        self.delay = 0.0
        self.inflight = self.max_inflight = 0
        self.auth: set = set()
        self.healed: set = set()  # queries whose "#down" tag no longer fails
        self.topic_cursor = self.question_cursor = 0

    def stage_calls(self, stage: str) -> int:
        return sum(n for (s, _), n in self.calls.items() if s == stage)

    @staticmethod
    def ok(content, finish="stop"):
        return 200, {"id": "x", "object": "chat.completion", "model": ScriptedLLM.model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": finish}]}

    def reply(self, body):
        msgs = body["messages"]
        system, last = msgs[0]["content"], msgs[-1]["content"]
        if '"critique"' in system:
            stage = "correction"
        elif '"topics"' in last:
            stage = "topics"
        elif '"questions"' in last:
            stage = "questions"
        else:
            stage = "answer"
        q = last.split("Question: ", 1)[1].split("\nAnswer: ", 1)[0] if stage in ("answer", "correction") else ""
        with self.lock:
            self.calls[(stage, q)] += 1
            n = self.calls[(stage, q)]
        if stage == "topics":
            with self.lock:
                t, self.topic_cursor = TOPICS[self.topic_cursor:self.topic_cursor + 3], self.topic_cursor + 3
            return self.ok("Here are some topics:\n" + json.dumps({"topics": t}))
        if stage == "questions":
            with self.lock:
                c = self.question_cursor
                self.question_cursor += 5
            return self.ok(json.dumps({"questions": QUESTIONS[c:c + 5]}))
        tag = (re.search(r"#(\w+)", q) or [None, "ok"])[1]
        ans = json.dumps({"answer": bad_answer(q)})
        fix = json.dumps({"critique": "The answer ignores the rules and the people affected.",
                          "correction": good_correction(q)})
        if tag == "ratelimit" and n == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if tag == "flaky" and n == 1:
            return 500, {"error": {"message": "boom"}}
        if tag == "down" and q not in self.healed:
            return 503, {"error": {"message": "overloaded"}}
        if tag == "slow" and n == 1:
            time.sleep(2.5)
        if tag == "badrequest":
            return 400, {"error": {"message": "context length exceeded"}}
        if tag == "garbage":
            return 200, b"<html>upstream proxy error</html>"
        if stage == "answer":
            special = {
                "malformed": "Sure! Here is my answer: you should just {not valid json",
                "nofield": json.dumps({"reply": bad_answer(q)}),
                "empty": '{"answer": "   "}',
                "french": json.dumps({"answer": FRENCH}),
                "long": json.dumps({"answer": "This is a long answer. " * 300}),
                "short": '{"answer": "Ok."}',
                "dupanswer": json.dumps({"answer": "I have no opinion on that topic at all, sorry about that."}),
                # prose, a code fence and a raw newline inside the JSON string
                "noisy": 'Sure! Here you go:\n```json\n{"answer": "line one\nline two: ' + q + '"}\n```\nHope it helps.',
            }
            if tag == "truncated":
                return self.ok('{"answer": "Sure, here is a long story that goes on and', "length")
            return self.ok(special.get(tag, ans))
        if tag == "badfix":
            return self.ok("Critique: it is rude. Correction: be nice.")
        if tag == "similar":
            return self.ok(json.dumps({"critique": "Too blunt.",
                                       "correction": bad_answer(q).replace("Honestly", "Frankly")}))
        return self.ok(fix)


@pytest.fixture(scope="module")
def server():
    s = ScriptedLLM()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def llm(server):
    server.reset()
    return server


@pytest.fixture(scope="module")
def embedder():
    e = Embedder()
    e.encode(["warm up"])
    return e


def api(server, **kw) -> OpenAIBackend:
    opts = dict(model=None, concurrency=4, timeout=10.0, max_retries=2, backoff=0.01)
    opts.update(kw)
    return OpenAIBackend(server.url, **opts)


def run(server, embedder, out, queries, backend=None, criterion="harmlessness", **cfg):
    cfg.setdefault("n", len(queries) if isinstance(queries, list) else 100)
    backend = backend or api(server)
    try:
        return generate(criterion, backend, out, GenerateConfig(**cfg), queries=queries,
                        embedder=embedder, progress=False, echo=False)
    finally:
        backend.close()


def journal(out) -> list[dict]:
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def by_query(out) -> dict[str, dict]:
    return {r["query"]: r for r in journal(out)}


# --------------------------------------------------------------------------- criteria


def test_bundled_criteria_follow_the_schema():
    names = list_criteria()
    assert {"harmlessness", "helpfulness", "factuality"} <= set(names)
    for name in names:
        c = load_criterion(name)
        assert c.name == name
        assert 2 <= len(c.principles) <= 3
        assert 10 <= len(c.seed_questions) <= 20
        assert 4 <= len(c.demonstrations) <= 7
        for d in c.demonstrations:  # our own demonstrations must pass our own filters
            for text in (d.query, d.answer, d.critique, d.correction):
                assert language_problem(text) is None, (name, text)
        assert c.digest == load_criterion(name).digest


def test_criterion_errors_name_the_field(tmp_path):
    data = json.loads((REPO / "synth" / "criteria" / "harmlessness.json").read_text())
    del data["demonstrations"][1]["critique"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CriterionError, match=r"demonstrations\[1\]\.critique"):
        load_criterion(bad)
    with pytest.raises(CriterionError, match="bundled: factuality"):
        load_criterion("no-such-criterion")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CriterionError, match="not valid JSON"):
        load_criterion(tmp_path / "broken.json")


def test_a_new_criterion_is_just_a_file(llm, embedder, tmp_path):
    data = json.loads((REPO / "synth" / "criteria" / "helpfulness.json").read_text())
    data["name"] = "politeness"
    path = tmp_path / "politeness.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "polite.jsonl"
    s = run(llm, embedder, out, ["How do I ask my neighbour to turn the music down?"], criterion=str(path))
    assert s["kept"] == 1
    rows = pd.read_json(sibling(out, "aligner"), lines=True)
    assert rows["source"].tolist() == ["synth:politeness"]
    # the demonstrations went into the prompt as few-shot turns
    msgs = answer_messages(load_criterion(path), "q?")
    assert len(msgs) == 2 + 2 * len(data["demonstrations"])
    assert data["principles"][0] in msgs[0]["content"]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,finish,expect", [
    ('{"answer": "fine"}', "stop", {"answer": "fine"}),
    ('Sure!\n```json\n{"answer": "in a fence"}\n```\nbye', "stop", {"answer": "in a fence"}),
    ('noise {"answer": "raw\nnewline"} trailing } junk', "stop", {"answer": "raw\nnewline"}),
    ('{"other": 1} then {"answer": "second object"}', "stop", {"answer": "second object"}),
    ('[{"answer": "wrapped in a list"}]', "stop", {"answer": "wrapped in a list"}),
    ('{"answer": "braces {inside} strings"}', "stop", {"answer": "braces {inside} strings"}),
    ("no json at all", "stop", "malformed"),
    ('{"answer": 42}', "stop", "malformed"),
    ('{"reply": "wrong key"}', "stop", "malformed"),
    ('{"answer": "  "}', "stop", "empty"),
    ("", "stop", "empty"),
    (None, None, "empty"),
    ('{"answer": "cut off mid', "length", "truncated"),
    ('{"answer": "cut off mid', "stop", "malformed"),
    ("{" * 5000, "stop", "malformed"),
])
def test_parse_fields_is_defensive(text, finish, expect):
    p = parse_fields(text, ("answer",), finish)
    if isinstance(expect, dict):
        assert p.values == expect and p.reason is None
    else:
        assert p.values is None and p.reason == expect


def test_parse_list_strips_numbering_and_rejects_garbage():
    assert parse_list('Topics: {"topics": ["1. cooking", "- pets", 3, ""]}', "topics") == (["cooking", "pets"], None)
    assert parse_list('["a question?"]', "questions") == (["a question?"], None)
    assert parse_list("nothing", "topics") == ([], "malformed")
    assert parse_list(None, "topics") == ([], "empty")


# --------------------------------------------------------------------------- filters


def test_language_heuristic():
    assert language_problem("Sure, here is how you can do it: first take the materials and put them in the box.") is None
    assert language_problem("How do I boil an egg?") is None
    assert language_problem("Run `kill -9 PID` to stop it.") is None
    assert "function words" in language_problem(FRENCH)
    assert "function words" in language_problem("Das ist eine gute Frage, aber ich kann dir dabei leider nicht helfen.")
    assert "no English function word" in language_problem("¿Cómo hago una tarta de manzana casera?")
    assert "ASCII" in language_problem("这是一个很好的问题，但是我不能帮助你，因为这很危险。")
    assert "ASCII" in language_problem("Это хороший вопрос, но я не могу вам помочь.")


def test_length_and_normalize():
    assert length_problem("  Ok.  ", 10, 100) == "too_short"
    assert length_problem("x" * 101, 10, 100) == "too_long"
    assert length_problem("just right here", 10, 100) is None
    assert normalize("How do I boil an EGG?!") == normalize("how do i  boil an egg")


def test_near_duplicate_index_and_pair_cosine(embedder):
    idx = NearDupIndex(0.9)
    first = idx.check(embedder.encode(["How can I pick a lock on a door?", "How do I bake bread at home?",
                                       "How can I pick the lock of a door?"]))
    assert first[0] is None and first[1] is None and first[2] >= 0.9
    later = idx.check(embedder.encode(["How do I bake bread at home??", "What is the capital of Peru?"]))
    assert later[0] >= 0.9 and later[1] is None
    assert len(idx) == 3
    sims = pair_cosine(embedder, [bad_answer("q"), "same text"], [good_correction("q"), "same text"])
    assert sims[0] < 0.9 <= sims[1]
    # a sentence-transformers model loaded elsewhere (aligner.evaluate takes one) gives the same figures
    wrapped = Embedder(model=embedder.model, batch_size=32)
    again = pair_cosine(wrapped, [bad_answer("q"), "same text"], [good_correction("q"), "same text"])
    assert again == pytest.approx(sims, abs=1e-5)
    assert len(pair_cosine(embedder, [], [])) == 0
    with pytest.raises(ValueError, match="as many"):
        pair_cosine(embedder, ["a"], ["b", "c"])


# --------------------------------------------------------------------------- API backend, end to end


def test_api_end_to_end_output_schemas(llm, embedder, tmp_path):
    out = tmp_path / "harm.jsonl"
    queries = QUESTIONS[:4] + ["How do I boil an egg so the yolk stays runny? #noisy"]
    s = run(llm, embedder, out, queries)
    assert s["kept"] == 5 and s["filtered"] == {} and s["records"] == 5 and s["new"] == 5
    assert llm.stage_calls("answer") == 5 and llm.stage_calls("correction") == 5

    ins = pd.read_json(sibling(out, "inspector"), lines=True)
    assert {"query", "answer", "label", "source", "criterion", "backend", "model",
            "prompt_version", "critique"} <= set(ins.columns)
    assert ins["label"].dtype.kind == "i" and ins["label"].value_counts().to_dict() == {1: 5, 0: 5}
    assert all(isinstance(v, str) and v for col in ("query", "answer", "source") for v in ins[col])
    assert set(ins["source"]) == {"synth:harmlessness"} and set(ins["backend"]) == {"openai"}
    assert set(ins["model"]) == {"scripted-model"}  # discovered through GET /models
    harmful = ins[ins.label == 1].set_index("query")["answer"]
    assert harmful[QUESTIONS[0]] == bad_answer(QUESTIONS[0])
    assert harmful[queries[-1]].startswith("line one\nline two")

    ali = pd.read_json(sibling(out, "aligner"), lines=True)
    assert {"query", "answer", "correction", "source", "criterion", "prompt_version"} <= set(ali.columns)
    assert len(ali) == 5 and (ali["answer"] != ali["correction"]).all()
    rec = journal(out)[0]
    assert rec["status"] == "kept" and 0 < rec["similarity"] < 0.9 and rec["query_source"] == "list"


def test_each_filter_is_counted_with_its_reason(llm, embedder, tmp_path):
    out = tmp_path / "f.jsonl"
    cases = {
        "How do I boil an egg so the yolk stays runny?": "kept",
        "how do I boil an egg so the yolk stays runny": "duplicate",
        "How can I pick a lock on a door?": "kept",
        "How can I pick the lock of a door?": "near_duplicate",
        "Comment puis-je faire une tarte aux pommes sans four à la maison ?": "wrong_language",
        "Hi?": "too_short",
        "What is the best way to store fresh basil? #malformed": "malformed",
        "How can I get my cat to stop scratching the sofa? #nofield": "malformed",
        "Which houseplants survive in a dark apartment? #truncated": "truncated",
        "How should I prepare for a job interview at a bank? #empty": "empty",
        "Why does my bicycle chain keep slipping? #french": "wrong_language",
        "How do I teach my grandmother to use video calls? #long": "too_long",
        "What should I do if my laptop battery swells? #short": "too_short",
        "How can I make my tomato plants produce more fruit? #dupanswer": "kept",
        "What is a fair way to split rent between roommates? #dupanswer": "duplicate",
        "How do I clean mold off a shower curtain? #similar": "correction_too_similar",
        "How can I stay focused while studying for exams? #badfix": "malformed",
        "Is it safe to leave a candle burning overnight? #badrequest": "backend_rejected",
        "How do I politely decline a wedding invitation? #garbage": "backend_rejected",
    }
    s = run(llm, embedder, out, list(cases), min_chars=10, max_chars=2000)
    recs = by_query(out)
    got = {q: (recs[q]["reason"] or "kept") if q in recs else "duplicate" for q in cases}
    assert got == cases
    expected = Counter(v for v in cases.values() if v != "kept")
    assert s["kept"] == 3 and s["filtered"] == dict(expected)
    # where it stopped, and the raw text of a bad generation kept for debugging
    assert recs["How can I stay focused while studying for exams? #badfix"]["stage"] == "correction"
    assert recs["Which houseplants survive in a dark apartment? #truncated"]["raw"]["finish_reason"] == "length"
    assert recs["How do I clean mold off a shower curtain? #similar"]["similarity"] >= 0.9
    # filtered queries never reached the model
    assert llm.calls[("answer", "How can I pick the lock of a door?")] == 0
    # a rerun redoes nothing: filtered records are final
    before = sum(llm.calls.values())
    s2 = run(llm, embedder, out, list(cases))
    assert sum(llm.calls.values()) == before and s2["new"] == 0 and s2["filtered"] == s["filtered"]


def test_thresholds_are_configurable(llm, embedder, tmp_path):
    qs = ["How can I pick a lock on a door?", "How can I pick the lock of a door?",
          "Comment puis-je faire une tarte aux pommes sans four à la maison ?"]
    # no language check, near duplicates only above 0.999, and every pair counts as too similar
    s = run(llm, embedder, tmp_path / "t.jsonl", qs, near_dup_threshold=0.999, language=None,
            similarity_threshold=-1.0)
    assert s["filtered"] == {"correction_too_similar": 3}


def test_retries_timeouts_and_transient_errors(llm, embedder, tmp_path):
    out = tmp_path / "r.jsonl"
    qs = ["What is the best way to store fresh basil? #ratelimit",
          "How can I get my cat to stop scratching the sofa? #flaky",
          "Which houseplants survive in a dark apartment? #slow",
          "How should I prepare for a job interview at a bank? #down"]
    s = run(llm, embedder, out, qs, backend=api(llm, timeout=1.5))
    assert s["kept"] == 3 and s["filtered"] == {"backend_error": 1}
    for q in qs[:3]:  # each step failed once (429 / 500 / timeout), then went through
        assert llm.calls[("answer", q)] == 2 and llm.calls[("correction", q)] == 2
    assert llm.calls[("answer", qs[3])] == 3  # 1 try + 2 retries
    down = by_query(out)[qs[3]]
    assert down["status"] == "error" and "503" in down["detail"]
    # the next run retries only the transient failure, and it now succeeds
    llm.healed.add(qs[3])
    s2 = run(llm, embedder, out, qs)
    assert s2["kept"] == 4 and s2["filtered"] == {} and s2["new"] == 1 and s2["resumed"] == 3
    assert llm.calls[("answer", qs[0])] == 2


def test_concurrency_is_bounded_and_api_key_sent(llm, embedder, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    llm.delay = 0.1
    b = api(llm, concurrency=3, model="my-model")
    assert b.model == "my-model"
    gens = b.generate([[{"role": "user", "content": f"Question: q{i}"}] for i in range(9)], GenParams())
    b.close()
    assert all(g.error is None for g in gens) and llm.max_inflight == 3
    assert llm.auth == {"Bearer sk-test"}


def test_unreachable_endpoint_fails_clearly(embedder, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(BackendError, match="pass --model"):
        OpenAIBackend(url, timeout=0.5)
    b = OpenAIBackend(url, model="m", timeout=0.5, max_retries=0)
    with pytest.raises(BackendError, match="every request of the first chunk failed"):
        generate("harmlessness", b, tmp_path / "x.jsonl", GenerateConfig(n=2),
                 queries=["How do I bake bread at home?", "What is the capital of Peru?"],
                 embedder=embedder, progress=False, echo=False)
    assert {r["status"] for r in journal(tmp_path / "x.jsonl")} == {"error"}


# --------------------------------------------------------------------------- resume


def test_resume_after_interrupt_loses_nothing_and_duplicates_nothing(llm, embedder, tmp_path):
    out = tmp_path / "res.jsonl"
    qs = QUESTIONS[:7]
    seen = []

    def ctrl_c_after_three(rec):
        seen.append(rec["key"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    b = api(llm)
    with pytest.raises(Interrupted) as exc:
        generate("harmlessness", b, out, GenerateConfig(n=7, chunk_size=2), queries=qs,
                 embedder=embedder, progress=False, echo=False, on_record=ctrl_c_after_three)
    b.close()
    # the chunk being written when Ctrl-C came is finished: 4 rows, all on disk, all exported
    assert exc.value.summary["interrupted"] and exc.value.summary["records"] == 4
    first = Path(out).read_text()
    assert len(first.splitlines()) == 4
    assert len(pd.read_json(sibling(out, "aligner"), lines=True)) == 4

    s = run(llm, embedder, out, qs, chunk_size=2)
    assert s["resumed"] == 4 and s["new"] == 3 and s["kept"] == 7 and not s["interrupted"]
    text = Path(out).read_text()
    assert text.startswith(first)  # earlier rows untouched, new ones appended
    keys = [r["key"] for r in journal(out)]
    assert len(keys) == len(set(keys)) == 7
    assert all(llm.calls[("answer", q)] == 1 for q in qs)  # nothing regenerated
    ali = pd.read_json(sibling(out, "aligner"), lines=True)
    assert sorted(ali["query"]) == sorted(qs)


def test_resume_survives_a_line_cut_by_a_kill(llm, embedder, tmp_path):
    out = tmp_path / "cut.jsonl"
    run(llm, embedder, out, QUESTIONS[:2])
    with open(out, "a") as f:
        f.write('{"key": "abc", "query": "half a reco')  # killed mid-write, no newline
    s = run(llm, embedder, out, QUESTIONS[:3])
    assert s["new"] == 1 and s["kept"] == 3
    lines = Path(out).read_text().splitlines()
    assert lines[2].startswith('{"key": "abc"') and json.loads(lines[3])["query"] == QUESTIONS[2]


def test_retry_failed_redoes_generation_failures(llm, embedder, tmp_path):
    out = tmp_path / "rf.jsonl"
    qs = ["What is the best way to store fresh basil? #malformed", "How do I bake bread at home?"]
    run(llm, embedder, out, qs)
    s = run(llm, embedder, out, qs, retry_failed=True)
    assert s["new"] == 1 and llm.calls[("answer", qs[0])] == 2 and llm.calls[("answer", qs[1])] == 1


# --------------------------------------------------------------------------- self-instruct


def test_self_instruct_topics_then_questions_and_reuse(llm, embedder, tmp_path):
    out = tmp_path / "si.jsonl"
    s = run(llm, embedder, out, None, n=8)
    assert s["records"] == 8 and s["kept"] == 8
    assert s["self_instruct"]["topics"] >= 2 and llm.stage_calls("topics") >= 1
    recs = journal(out)
    assert {r["query_source"] for r in recs} == {"self-instruct"} and all(r["topic"] in TOPICS for r in recs)
    # the two question calls run concurrently, so which five questions come first varies: look in the pool
    pooled = {json.loads(x).get("query") for x in sibling(out, "queries").read_text().splitlines()}
    assert "Why does my bicycle chain keep slipping?" in pooled  # "1. " stripped
    assert not any(q and q.startswith("1.") for q in pooled | {r["query"] for r in recs})
    calls = sum(llm.calls.values())
    s2 = run(llm, embedder, out, None, n=8)  # same args: the pool and the work are reused
    assert sum(llm.calls.values()) == calls and s2["new"] == 0
    s3 = run(llm, embedder, out, None, n=12)  # more: only the missing queries are generated
    assert s3["new"] == 4 and s3["records"] == 12
    pool = [json.loads(x) for x in sibling(out, "queries").read_text().splitlines()]
    assert sum(p["kind"] == "query" for p in pool) >= 12


# --------------------------------------------------------------------------- query files


def test_query_files(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"query": "a?"}\n\n{"query": "b?"}\n')
    (tmp_path / "q.csv").write_text('id,prompt\n1,"first, with comma?"\n2,second?\n')
    (tmp_path / "q.txt").write_text("one?\n\n two? \n")
    assert load_queries(tmp_path / "q.jsonl") == ["a?", "b?"]
    assert load_queries(tmp_path / "q.csv", field="prompt", limit=1) == ["first, with comma?"]
    assert load_queries(tmp_path / "q.txt") == ["one?", "two?"]
    assert sorted(load_queries(tmp_path / "q.jsonl", shuffle_seed=1)) == ["a?", "b?"]
    (tmp_path / "bad.jsonl").write_text('{"query": "ok"}\n{"text": "no query"}\n')
    with pytest.raises(QueryFileError, match=r"bad.jsonl: row 2: field 'query' is missing"):
        load_queries(tmp_path / "bad.jsonl")
    with pytest.raises(QueryFileError, match=r"q.csv: missing column\(s\) \['query'\]; found \['id', 'prompt'\]"):
        load_queries(tmp_path / "q.csv")
    (tmp_path / "excel.csv").write_bytes("\ufeffquery,id\nfirst?,1\n".encode("utf-8"))  # a BOM
    assert load_queries(tmp_path / "excel.csv") == ["first?"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ouvert?\n".encode("latin-1"))
    with pytest.raises(QueryFileError, match="latin1.txt: not UTF-8 text"):
        load_queries(tmp_path / "latin1.txt")
    (tmp_path / "latin1.jsonl").write_bytes('{"query": "caf\xe9?"}\n'.encode("latin-1"))
    with pytest.raises(QueryFileError, match="latin1.jsonl: line 1: not UTF-8 text"):
        load_queries(tmp_path / "latin1.jsonl")


def test_query_files_are_tables_read_like_everywhere_else(tmp_path):
    """A .json queries file is a JSON array of objects (as for the batch job and training), a
    .parquet or .csv.gz file works too, and a .json holding one object per line is refused."""
    import gzip

    import pandas as pd

    (tmp_path / "q.json").write_text(json.dumps([{"query": " a? "}, {"query": "b?", "topic": "x"}]))
    assert load_queries(tmp_path / "q.json") == ["a?", "b?"]
    pd.DataFrame({"prompt": ["p1?", "p2?"]}).to_parquet(tmp_path / "q.parquet")
    assert load_queries(tmp_path / "q.parquet", field="prompt", limit=1) == ["p1?"]
    with gzip.open(tmp_path / "q.csv.gz", "wt") as f:
        f.write("query\nfirst?\n")
    assert load_queries(tmp_path / "q.csv.gz") == ["first?"]
    (tmp_path / "lines.json").write_text('{"query": "a?"}\n{"query": "b?"}\n')
    with pytest.raises(QueryFileError, match="lines.json: line 1: expected a JSON array of objects"):
        load_queries(tmp_path / "lines.json")


@pytest.mark.parametrize("field, value, words", [
    ("n", -2, "n must be at least 1"), ("max_new_tokens", 0, "max_new_tokens must be at least 1"),
    ("near_dup_threshold", float("nan"), "near_dup_threshold must be a cosine"),
    ("similarity_threshold", 1.5, "similarity_threshold must be a cosine"),
    ("temperature", float("nan"), "temperature must be"), ("max_chars", 5, "max_chars must be at least min_chars"),
])
def test_config_refuses_settings_that_would_break_or_disable_a_step(field, value, words):
    with pytest.raises(ValueError, match=words):
        GenerateConfig(**{field: value})


def test_outputs_that_would_overwrite_the_journal_are_refused(llm, embedder, tmp_path, capsys):
    from synth.cli import main

    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(QUESTIONS[:2]) + "\n")
    out = tmp_path / "c.jsonl"
    base = ["generate", "--criterion", "helpfulness", "--backend", f"openai:{llm.url}", "--queries", str(qfile),
            "--n", "2", "--out", str(out), "--no-progress", "--backoff", "0.01"]
    assert main(base + ["--inspector-out", str(out)], embedder=embedder) == 2
    assert "--inspector-out and --out (the journal) are the same file" in capsys.readouterr().err
    assert not out.exists() and sum(llm.calls.values()) == 0  # refused before any generation
    assert main(base + ["--aligner-out", str(tmp_path / "x.jsonl"), "--inspector-out", str(tmp_path / "x.jsonl")],
                embedder=embedder) == 2
    assert main(base, embedder=embedder) == 0
    before = out.read_text()
    assert main(["export", "--out", str(out), "--aligner-out", str(out)]) == 2
    assert out.read_text() == before  # the journal is intact
    assert main(["export", "--out", str(tmp_path / "typo.jsonl")]) == 2
    assert "journal" in capsys.readouterr().err and not (tmp_path / "typo.inspector.jsonl").exists()
    with pytest.raises(SystemExit):
        main(base + ["--backoff", "-1"], embedder=embedder)
    assert "--backoff must be >= 0, got -1" in capsys.readouterr().err
    assert main([str(tmp_path) if a == str(out) else a for a in base], embedder=embedder) == 2
    assert "is a folder" in capsys.readouterr().err


def test_queries_from_the_shared_prompts_file(llm, embedder, tmp_path, shared_data):
    out = tmp_path / "shared.jsonl"
    s = run(llm, embedder, out, str(shared_data / "prompts.jsonl"), n=4)
    assert s["records"] + s["filtered"].get("duplicate", 0) >= 4
    assert {r["query_source"] for r in journal(out)} == {"file:prompts.jsonl"}


# --------------------------------------------------------------------------- hf backend


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny GPT-2s (random weights) with the MiniLM tokenizer: one plain, one with a chat
    template, one with only 64 positions."""
    import torch
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5Config,
                              T5ForConditionalGeneration)

    from inspector.encoder import resolve_embedder

    tok = AutoTokenizer.from_pretrained(resolve_embedder(None))
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for name, positions, template in [("plain", 4096, None), ("chat", 4096, True), ("short", 64, None)]:
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=positions, n_embd=32, n_layer=1, n_head=2,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id)
        d = root / name
        GPT2LMHeadModel(cfg).save_pretrained(d)
        tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}") if template else None
        tok.save_pretrained(d)
        paths[name] = str(d)
    torch.manual_seed(0)  # an encoder-decoder too: "any local transformers model"
    t5 = T5Config(vocab_size=tok.vocab_size, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                  decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                  pad_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(t5).save_pretrained(root / "t5")
    tok.chat_template = None
    tok.save_pretrained(root / "t5")
    paths["t5"] = str(root / "t5")
    return paths


def test_hf_garbage_output_is_counted_not_a_crash(tiny_models, embedder, tmp_path):
    out = tmp_path / "hf.jsonl"
    b = HFBackend(tiny_models["plain"], batch_size=2)
    qs = QUESTIONS[:3]
    s = generate("factuality", b, out, GenerateConfig(n=3, max_new_tokens=12, temperature=0.0),
                 queries=qs, embedder=embedder, progress=False, echo=False)
    assert s["kept"] == 0 and s["records"] == 3
    assert set(s["filtered"]) <= {"malformed", "truncated", "empty"} and sum(s["filtered"].values()) == 3
    recs = journal(out)
    assert all(r["stage"] == "answer" and r["backend"] == "hf" and r["model"] == tiny_models["plain"]
               for r in recs)
    assert all("raw" in r for r in recs)
    assert pd.read_json(sibling(out, "inspector"), lines=True).empty


def test_hf_batching_left_padding_and_templates(tiny_models):
    c = load_criterion("helpfulness")
    short = [{"role": "user", "content": "Question: hi?"}]
    long = answer_messages(c, "How do I fix a flat tire on a mountain bike quickly?")
    greedy = GenParams(max_new_tokens=8, temperature=0.0)
    b = HFBackend(tiny_models["plain"], batch_size=4)
    assert not b.has_template and b.render(short).endswith("### Assistant:\n")
    together = b.generate([short, long], greedy)
    alone = b.generate([short], greedy)
    assert together[0].text == alone[0].text and together[0].finish_reason in ("stop", "length")
    assert together[1].error is None

    chat = HFBackend(tiny_models["chat"])
    text = chat.render(long)
    assert text.startswith("<|system|>") and text.endswith("<|assistant|>")

    t5 = HFBackend(tiny_models["t5"])
    assert t5.seq2seq and [g.error for g in t5.generate([long, short], greedy)] == [None, None]

    tiny = HFBackend(tiny_models["short"])
    g = tiny.generate([long, short], greedy)
    assert "prompt too long" in g[0].error and not g[0].transient and g[1].error is None


def test_hf_out_of_memory_halves_the_batch(tiny_models, monkeypatch):
    """The backend generates through ``aligner.model.generate_batched``: a batch that runs out of
    GPU memory is split and retried; a prompt that does not fit alone is a transient error."""
    import torch

    c = load_criterion("helpfulness")
    convs = [answer_messages(c, q) for q in QUESTIONS[:4]]
    greedy = GenParams(max_new_tokens=6, temperature=0.0)
    b = HFBackend(tiny_models["plain"], batch_size=4)
    want = b.generate(convs, greedy)
    real, sizes = b.lm.generate, []

    def generate(input_ids, **kw):
        sizes.append(len(input_ids))
        if len(input_ids) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(input_ids=input_ids, **kw)

    monkeypatch.setattr(b.lm, "generate", generate)
    limit = 2
    got = b.generate(convs, greedy)
    assert sizes == [4, 2, 2] and [(g.text, g.finish_reason) for g in got] == [(g.text, g.finish_reason) for g in want]
    limit = 0
    g = b.generate(convs[:1], greedy)[0]
    assert g.text is None and g.transient and g.error == "generate failed: out of GPU memory"


def test_hf_backend_refuses_an_encoder():
    from inspector.encoder import resolve_embedder

    with pytest.raises(BackendError, match="without a text-generation head"):
        HFBackend(resolve_embedder(None), device="cpu")


def test_hf_too_long_prompt_is_a_filtered_row(tiny_models, embedder, tmp_path):
    out = tmp_path / "short.jsonl"
    s = generate("helpfulness", HFBackend(tiny_models["short"]), out, GenerateConfig(n=1, max_new_tokens=4),
                 queries=["How do I fix a flat tire on a mountain bike?"], embedder=embedder,
                 progress=False, echo=False)
    assert s["filtered"] == {"backend_rejected": 1}


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow  # the synth CLI in a subprocess, interrupted and resumed
def test_cli_ctrl_c_then_resume(llm, embedder, tmp_path, capsys):
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(QUESTIONS[5:13]) + "\n")
    out = tmp_path / "cli.jsonl"
    argv = ["generate", "--criterion", "helpfulness", "--backend", f"openai:{llm.url}",
            "--queries", str(qfile), "--n", "8", "--out", str(out), "--chunk-size", "1",
            "--concurrency", "1", "--no-progress", "--backoff", "0.01"]
    llm.delay = 0.3
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "synth", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "INTERRUPTED" in output and "kept:" in output
    done = journal(out)  # every line complete
    assert 2 <= len(done) < 8

    llm.delay = 0.0
    from synth.cli import main

    assert main(argv, embedder=embedder) == 0
    printed = capsys.readouterr().out
    assert "kept: 8" in printed and f"{len(done)} done earlier" in printed
    keys = [r["key"] for r in journal(out)]
    assert len(keys) == len(set(keys)) == 8
    not_done = [q for q in QUESTIONS[5:13] if q not in {r["query"] for r in done}]
    # chunk size 1, concurrency 1: at most the one item in flight at the interrupt is asked twice
    assert all(1 <= llm.calls[("answer", q)] <= 2 for q in not_done)
    assert sum(llm.calls[("answer", q)] - 1 for q in not_done) <= 1
    assert main(["generate", "--criterion", "nope", "--backend", "openai:x", "--n", "1", "--out", str(out)]) == 2
