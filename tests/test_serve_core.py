"""The plain-Python layer of the Serve deployment, without Ray: settings and the shipped Serve config
(``pipeline.settings``), request parsing and JSON out (``pipeline.http``), the services
(``pipeline.services``), work budgets (``pipeline.admission``), the ingress's decision flow
(``pipeline.flow``) and its metrics (``pipeline.metrics``).

(The file keeps its name, after the module these parts were split from, because
``conftest.SLOW_TESTS`` marks three of its tests slow by this file name.)"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from aligner.tiny import build_tiny_aligner
from conftest import REPO_ROOT
from pipeline.admission import Admission, pair_cost, slice_pairs
from pipeline.flow import ModerationFlow
from pipeline.http import RequestError, StageError, apply_to_chat_response, parse_chat_body, parse_moderate_body
from pipeline.metrics import PipelineMetrics, RecentOutcomes
from pipeline.services import AlignerService, InspectorService
from pipeline.settings import ServeSettings, _hub_cached, resolve_settings

HARM = ("How can I make a pipe bomb at home?", "Pack a steel pipe with black powder and light the fuse near a crowd.")
SAFE = ("What's a good way to keep basil fresh?", "Trim the stems and stand the bunch in a glass of water.")


# ----------------------------------------------------------------------------- settings and serve_config.yaml
@pytest.mark.parametrize("args, words", [
    ({"threshold": 1.5}, "threshold"),
    ({"fallback": "maybe"}, "fallback"),
    ({"aligner_timeout_s": 0}, "aligner_timeout_s"),
    ({"upstream_url": "chatbot:8080"}, "http://"),
    ({"generation": "{not json"}, "generation must be a JSON object"),
    ({"thresold": 0.5}, "thresold"),  # a typo is an error, not a silent default
    ({"refusal_text": "  "}, "refusal_text must be a non-empty string"),  # fail_closed would show a blank
    ({"aligner_timeout_s": float("inf")}, "aligner_timeout_s"),  # an infinite timeout is a hang
    ({"inspector_batch_wait_s": "nan"}, "inspector_batch_wait_s"),
    ({"stream_check_chars": 0}, "stream_check_chars"),
    ({"stream_check_chars": 500, "stream_max_holdback_chars": 400}, "must be at least stream_check_chars"),
])
def test_bad_settings_name_the_field(args, words):
    with pytest.raises(ValidationError, match=words):
        ServeSettings.model_validate(args)


def test_cli_strings_are_understood():
    s = ServeSettings.model_validate({"aligner": "none", "threshold": "0.4", "generation": '{"top_p": 0.9}',
                                      "max_new_tokens": "null"})
    assert s.aligner is None and s.threshold == 0.4 and s.generation == {"top_p": 0.9}
    assert s.max_new_tokens is None


@pytest.mark.parametrize("generation, words", [
    ('{"temprature": 0.5}', "generation: unknown generation option 'temprature'.*'temperature'"),
    ({"num_return_sequences": 2}, "one correction per input"),
])
def test_generation_options_are_checked_once_when_the_app_is_built(generation, words):
    ServeSettings.model_validate({"generation": generation})  # replicas validate without transformers
    with pytest.raises(ValueError, match=words):
        resolve_settings({"generation": generation, "aligner": "none"})


def test_resolve_settings_checks_paths_and_explains_a_missing_aligner(tmp_path, monkeypatch):
    import aligner

    with pytest.raises(ValueError, match="no config.json"):
        resolve_settings({"inspector": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="no model found there"):
        resolve_settings({"aligner": str(tmp_path / "missing-aligner")})
    monkeypatch.setattr(aligner, "find_default_aligner", lambda: None)
    s, note = resolve_settings({"aligner": "auto"})
    assert s.aligner is None and note == aligner.HOW_TO_GET_DEFAULT
    s, note = resolve_settings({"aligner": "org/some-aligner", "download_models": True})  # left to Aligner.load
    assert s.aligner == "org/some-aligner" and note is None


@pytest.mark.parametrize("name", ["org/not-cached-aligner", "bad id with spaces"])
def test_hub_id_not_in_the_local_cache_fails_the_build(name):
    """It used to pass the check and leave replicas restarting forever (offline, or no such id)."""
    from pipeline.serve import build_app

    with pytest.raises(ValueError, match="not in the local cache.*download_models=true"):
        resolve_settings({"aligner": name})
    with pytest.raises(ValueError, match="not in the local cache"):
        build_app({"aligner": name})


def test_inspector_embedder_hub_id_not_cached_fails_the_build(tmp_path):
    from inspector import DEFAULT_MODEL_DIR

    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "embedder": "org/not-cached-embedder"}))
    with pytest.raises(ValueError, match="embedder.*not in the local cache"):
        resolve_settings({"inspector": str(tmp_path), "aligner": "none"})
    resolve_settings({"inspector": str(tmp_path), "aligner": "none", "download_models": True})


def test_shipped_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve import build_app

    cfg = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app_cfg = cfg["applications"][0]
    assert app_cfg["import_path"] == "pipeline.serve:build_app"
    settings = ServeSettings.model_validate(app_cfg["args"])
    assert settings.aligner_num_gpus >= 1 and settings.upstream_url
    assert {"stream_check_chars", "stream_max_holdback_chars"} <= set(app_cfg["args"])  # streaming is configured
    names = {d.name for d in schema.applications[0].deployments}
    assert names == {"Inspector", "Aligner", "Moderator"}
    for d in schema.applications[0].deployments:
        if d.name in ("Inspector", "Aligner"):
            assert d.autoscaling_config["min_replicas"] >= 1
        if d.name == "Moderator":
            assert d.max_queued_requests > 0  # overload answers 503 rather than queueing forever
    # the deployment graph build_app makes from these args (its hub id, if not cached, fails the build)
    if not settings.download_models and "/" in settings.aligner and not Path(settings.aligner).exists():
        if not _hub_cached(settings.aligner):
            with pytest.raises(ValueError, match="not in the local cache"):
                build_app(app_cfg["args"])
    ingress = build_app({**app_cfg["args"], "download_models": True})._bound_deployment
    assert ingress.name == "Moderator"
    children = {a._bound_deployment.name: a._bound_deployment for a in ingress.init_args[:2]}
    assert children["Aligner"].ray_actor_options["num_gpus"] == settings.aligner_num_gpus
    assert children["Inspector"].ray_actor_options.get("num_gpus", 0) == 0


# ----------------------------------------------------------------------------- request parsing
def test_parse_moderate_single_list_and_messages():
    is_list, items = parse_moderate_body(json.dumps({"query": "q", "answer": "a"}).encode(), 10, 100)
    assert not is_list and (items[0].query, items[0].answer) == ("q", "a")
    body = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
            {"query": "q2"}, "text", {"query": "q3", "answer": "x" * 101}]
    is_list, items = parse_moderate_body(json.dumps(body).encode(), 10, 100)
    assert is_list and [it.index for it in items] == [0, 1, 2, 3]
    assert (items[0].query, items[0].answer, items[0].error) == ("q1", "a1", None)
    assert items[1].error.startswith("item 1: field 'answer' is missing")
    assert items[2].error == "item 2: expected an object with 'query' and 'answer', got str"
    assert "too long (101 characters; the limit is 100)" in items[3].error


@pytest.mark.parametrize("raw, status", [(b"", 400), (b"{", 400), (b"3", 422), (b"[]", 422),
                                         (b'[{"query":"q","answer":"a"},{"query":"q","answer":"a"}]', 413),
                                         (b'{"query": "q", "answer": ""}', 422)])
def test_parse_moderate_rejects_unusable_bodies(raw, status):
    with pytest.raises(RequestError) as e:
        parse_moderate_body(raw, 1, 100)
    assert e.value.status == status and e.value.detail


@pytest.mark.parametrize("raw, words", [
    (b'{"query": "q", "answer": NaN}', "NaN is not a JSON value"),
    (b'{"query": ' + b"1" * 5000 + b', "answer": "a"}', "not valid JSON"),  # past Python's digit limit
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"query": "q", "answer": "a", "n": 1e999}', "1e999 is not a finite number"),  # infinity, like NaN
    (b'{"query": "q", "answer": "a", "n": [-2E+400]}', "-2E\\+400 is not a finite number"),
])
def test_hostile_json_is_a_400_not_a_crash(raw, words):
    for parse in (lambda r: parse_moderate_body(r, 10, 100), lambda r: parse_chat_body(r, 100)):
        with pytest.raises(RequestError, match=words) as e:
            parse(raw)
        assert e.value.status == 400


def test_bad_text_in_one_item_fails_only_that_item():
    """A lone surrogate (JSON escape \\ud800) or a non-string role is that item's error."""
    raw = (b'[{"query": "q", "answer": "a"}, {"query": "q", "answer": "x\\udfff"},'
           b' {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}]')
    is_list, items = parse_moderate_body(raw, 10, 100)
    assert items[0].error is None
    assert "item 1: field 'answer' is not valid Unicode text" in items[1].error
    assert items[2].error == "item 2: messages[0] role must be a string, got list"
    with pytest.raises(RequestError, match="'query' is not valid Unicode") as e:
        parse_moderate_body(b'{"query": "\\ud800", "answer": "a"}', 10, 100)
    assert e.value.status == 422
    with pytest.raises(RequestError, match="not valid Unicode") as e:  # the chat body is forwarded whole
        parse_chat_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 100)
    assert e.value.status == 422


def test_parse_chat_body():
    body = {"model": "m", "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                                       {"role": "user", "content": [{"type": "text", "text": "last"},
                                                                    {"type": "image_url", "image_url": {}}]}]}
    fwd, query = parse_chat_body(json.dumps(body).encode(), 100)
    assert fwd == body and query == "last"
    for bad, words in (({"messages": []}, "non-empty list"), ({"messages": [{"content": "x"}]}, "messages[0]"),
                       ({"messages": [{"role": "system", "content": "x"}]}, "no 'user' turn"),
                       ({**body, "stream": True, "n": 2}, "stream=true with n=2 is not supported"),
                       ({**body, "stream": "yes"}, "'stream' must be true or false")):
        with pytest.raises(RequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_chat_body(json.dumps(bad).encode(), 100)
    for ok in ({**body, "stream": True}, {**body, "stream": True, "n": 1}, {**body, "stream": None}):
        assert parse_chat_body(json.dumps(ok).encode(), 100) == (ok, "last")  # streamed by pipeline.streaming


# ----------------------------------------------------------------------------- metrics
def test_fallback_reasons_are_typed_and_label_the_metrics():
    """The metric's reason label is the result's ``Reason``, never parsed from the English ``problem``."""
    from aligner.results import CorrectionResult, Reason, degenerate_reason
    from pipeline.routing import Moderation, PipelineConfig, decide

    assert degenerate_reason("empty output") is Reason.EMPTY_OUTPUT
    assert degenerate_reason("runaway repetition") is Reason.DEGENERATE and degenerate_reason(None) is None
    assert CorrectionResult("", False, "whatever a third-party aligner says").reason is Reason.UNUSABLE
    assert CorrectionResult("fine", True, "input shortened").reason is None
    cfg = PipelineConfig()
    assert decide("a", True, None, cfg).reason is Reason.NO_ALIGNER
    assert decide("a", True, CorrectionResult.failed(Reason.TIMEOUT, "anything at all"), cfg).reason is Reason.TIMEOUT
    assert decide("a", True, CorrectionResult("  ", True), cfg).reason is Reason.EMPTY_OUTPUT
    assert decide("a", True, CorrectionResult("b", True, "input shortened"), cfg).reason is None
    assert decide("a", False, None, cfg).reason is None
    m = PipelineMetrics(export=False)
    # the words say "timed out" but the reason says overloaded: the label follows the reason
    odd = Moderation(0.9, True, "a", "a", False, None, None, "fail_open", "timed out, sort of", {},
                     Reason.OVERLOADED)
    m.outcomes("moderate", [odd], "fail_open")
    assert m.totals[("fallbacks", ("endpoint", "moderate"), ("policy", "fail_open"), ("reason", "overloaded"))] == 1
    assert odd.to_dict()["reason"] == "overloaded" and json.loads(json.dumps(odd.to_dict()))["reason"] == "overloaded"
    mk = lambda flagged, corrected, fb, problem=None, reason=None: Moderation(  # noqa: E731
        0.5, flagged, "a", "a", corrected, None, None, fb, problem, {}, reason)
    m = PipelineMetrics(export=False)
    m.outcomes("moderate", [mk(False, False, None), mk(True, True, None),
                            mk(True, False, "fail_open", "aligner timed out after 1 s", Reason.TIMEOUT)],
               "fail_open")
    m.request("moderate", 200, 12.0)
    assert m.totals["pairs"] == 3 and m.totals["flagged"] == 2 and m.totals["corrected"] == 1
    assert m.totals[("fallbacks", ("endpoint", "moderate"), ("policy", "fail_open"), ("reason", "timeout"))] == 1
    assert m.totals[("requests", ("endpoint", "moderate"), ("status", 200))] == 1
    m.stream(ttft_ms=120.0, holdback_ms=80.0, holdback_chars=140, checks=3)
    m.stream(ttft_ms=None, holdback_ms=0.0, holdback_chars=0, checks=0)  # ended before any text
    m.stream_flag("during")
    assert m.totals["streams"] == 2 and m.totals["stream_checks"] == 3
    assert m.totals[("stream_flags", ("when", "during"))] == 1


# ----------------------------------------------------------------------------- services and the flow
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_aligner(tmp_path_factory.mktemp("core") / "tiny", "causal", seed=0, max_positions=1024,
                              max_new_tokens=6)


@pytest.fixture(scope="module")
def aligner_service(tiny_dir):
    return AlignerService(str(tiny_dir), device="cpu", generation={"max_new_tokens": 6}, timeout_s=30)


@pytest.fixture(scope="module")
def inspector_service():
    return InspectorService(None)  # $INSPECTOR_MODEL or the bundled inspector


def test_aligner_service_answers_every_pair(aligner_service):
    res = aligner_service.correct_pairs([HARM, SAFE, ("q", 42)])
    assert len(res) == 3
    assert res[0].ok and res[0].text and res[1].ok
    assert not res[2].ok and "must be strings" in res[2].problem
    assert aligner_service.correct_pairs([]) == []


def test_aligner_service_with_bad_generation_values_fails_to_start(tiny_dir):
    with pytest.raises(ValueError, match="num_beams"):
        AlignerService(str(tiny_dir), device="cpu", generation={"num_beams": 0})


def test_aligner_service_deadline_gives_failed_results(tiny_dir):
    slow = AlignerService(str(tiny_dir), device="cpu", generation={"max_new_tokens": 900, "min_new_tokens": 900},
                          timeout_s=0.05)
    res = slow.correct_pairs([HARM, SAFE])
    assert all(not r.ok and "timed out" in r.problem for r in res)


def test_inspector_service_scores_valid_pairs_and_reports_bad_ones(inspector_service):
    out = inspector_service.score_pairs([HARM, ("q", ""), SAFE, (None, "a")])
    assert out[0].error is None and 0 <= out[0].score <= 1 and out[2].error is None
    assert out[1].score is None and "answer is empty" in out[1].error
    assert "query must be a string" in out[3].error
    direct = inspector_service.inspector.score([HARM[0], SAFE[0]], [HARM[1], SAFE[1]])
    np.testing.assert_allclose([out[0].score, out[2].score], direct, atol=1e-6)


def test_inspector_service_isolates_a_pair_the_model_fails_on(inspector_service, monkeypatch):
    """Pairs are scored in one batch; if the model still raises on one, the others get scores."""
    real = inspector_service.inspector.score

    def fails_on_boom(queries, answers, **kw):
        if "boom" in answers:
            raise RuntimeError("tokenizer exploded")
        return real(queries, answers, **kw)

    monkeypatch.setattr(inspector_service.inspector, "score", fails_on_boom)
    out = inspector_service.score_pairs([HARM, ("q", "boom"), SAFE, ("q", "\ud800")])
    assert out[0].error is None and out[2].error is None
    np.testing.assert_allclose([out[0].score, out[2].score], real([HARM[0], SAFE[0]], [HARM[1], SAFE[1]]),
                               atol=1e-6)
    assert out[1].score is None and "RuntimeError: tokenizer exploded" in out[1].error
    assert out[3].score is None and "answer is not valid Unicode" in out[3].error


def test_inspector_service_int8_setting(inspector_service):
    """inspector_int8 loads the quantised encoder; /health-style info says which one is serving."""
    assert ServeSettings().inspector_int8 is False and inspector_service.info()["int8"] is False
    assert inspector_service.info()["members"] == inspector_service.inspector.config.get("members", 1)
    q8 = InspectorService(None, int8=ServeSettings(inspector_int8=True).inspector_int8)
    assert q8.info()["int8"] is True
    out = q8.score_pairs([HARM, SAFE])
    direct = q8.inspector.score([HARM[0], SAFE[0]], [HARM[1], SAFE[1]])
    np.testing.assert_allclose([o.score for o in out], direct, atol=1e-6)


def _flow(inspector_service, aligner_service, threshold, fail_score=False, fail_aligner=False, **settings):
    """A ModerationFlow over the real services, with the failures a deployment can have injected."""
    calls = {"score": 0}

    async def score(q, a):
        calls["score"] += 1
        if fail_score and calls["score"] >= fail_score:
            raise StageError("inspector", "inspector unavailable: test")
        return np.array([x.score for x in inspector_service.score_pairs(list(zip(q, a)))])

    async def correct(q, a):
        if fail_aligner:
            from aligner.results import CorrectionResult, Reason
            return [CorrectionResult.failed(Reason.ALIGNER_ERROR, "aligner error: RayActorError: the actor died")
                    for _ in q]
        return aligner_service.correct_pairs(list(zip(q, a)))

    async def thr():
        return threshold

    s = ServeSettings.model_validate({"threshold": threshold, **settings})
    return ModerationFlow(s, score, correct if aligner_service else None, thr), calls


def test_flow_matches_the_in_process_pipeline(inspector_service, aligner_service):
    from pipeline.core import ModerationPipeline
    from pipeline.routing import PipelineConfig

    scores = inspector_service.inspector.score([HARM[0], SAFE[0]], [HARM[1], SAFE[1]])
    t = float(scores.mean())  # one pair on each side
    flow, _ = _flow(inspector_service, aligner_service, t, max_new_tokens=6)
    got = asyncio.run(flow.moderate([HARM[0], SAFE[0]], [HARM[1], SAFE[1]]))
    ref = ModerationPipeline(inspector_service.inspector, aligner_service.aligner,
                             PipelineConfig(threshold=t, max_new_tokens=6)).moderate([HARM[0], SAFE[0]],
                                                                                     [HARM[1], SAFE[1]])
    assert sum(g.flagged for g in got) == 1
    for g, r in zip(got, ref):
        assert (g.flagged, g.corrected, g.answer, g.fallback) == (r.flagged, r.corrected, r.answer, r.fallback)
        assert g.score == pytest.approx(r.score) and set(g.timings_ms) >= {"inspector_ms", "total_ms"}
    assert flow.metrics.totals["flagged"] == 1 and flow.metrics.totals["corrected"] == sum(g.corrected for g in got)


def test_flow_failure_policies(inspector_service, aligner_service):
    q, a = [HARM[0], SAFE[0]], [HARM[1], SAFE[1]]
    # a dead aligner: fail_closed shows the refusal, says why, and counts the error
    flow, _ = _flow(inspector_service, aligner_service, 0.0, fail_aligner=True, fallback="fail_closed",
                    refusal_text="No.")
    out = asyncio.run(flow.moderate(q, a))
    assert [o.answer for o in out] == ["No.", "No."] and all(o.fallback == "fail_closed" for o in out)
    assert all("actor died" in o.problem for o in out) and flow.metrics.totals["errors"] == 2
    # no aligner at all: fail_open keeps the answers
    flow, _ = _flow(inspector_service, None, 0.0)
    out = asyncio.run(flow.moderate(q, a))
    assert [o.answer for o in out] == a and all(o.problem == "no aligner configured" for o in out)
    # the inspector failing while re-scoring a correction keeps the correction, without a score
    flow, calls = _flow(inspector_service, aligner_service, 0.0, fail_score=2, max_new_tokens=6)
    out = asyncio.run(flow.moderate(q, a))
    assert calls["score"] == 2 and all(o.corrected and o.corrected_score is None for o in out)
    # the inspector failing first is the request's failure (the gate cannot be skipped)
    flow, _ = _flow(inspector_service, aligner_service, 0.0, fail_score=1)
    with pytest.raises(StageError, match="inspector unavailable"):
        asyncio.run(flow.moderate(q, a))


@pytest.mark.parametrize("policy, shown", [("fail_closed", "No."), ("fail_open", HARM[1])])
def test_flow_correction_still_flagged_gets_the_fallback(inspector_service, aligner_service, policy, shown):
    """Re-inspection counts: at threshold 0 every correction is still flagged, so none is shown;
    the policy applies with the reason, and the batch job's ModerationPipeline agrees."""
    from pipeline.core import ModerationPipeline
    from pipeline.routing import STILL_FLAGGED, PipelineConfig

    q, a = [HARM[0], SAFE[0]], [HARM[1], SAFE[1]]
    assert all(r.ok and r.text.strip() for r in aligner_service.correct_pairs(list(zip(q, a))))  # usable text
    flow, calls = _flow(inspector_service, aligner_service, 0.0, fallback=policy, refusal_text="No.",
                        max_new_tokens=6)
    out = asyncio.run(flow.moderate(q, a))
    assert calls["score"] == 2  # the corrections were re-inspected
    assert out[0].answer == shown and out[1].answer == ("No." if policy == "fail_closed" else SAFE[1])
    for o in out:
        assert o.flagged and not o.corrected and o.fallback == policy and o.corrected_score is None
        assert o.problem.startswith(STILL_FLAGGED) and "threshold 0.000" in o.problem
        assert o.corrected_answer == ("No." if policy == "fail_closed" else None)
    assert flow.metrics.totals["corrected"] == 0
    assert flow.metrics.totals[("fallbacks", ("endpoint", "moderate"), ("policy", policy),
                                ("reason", "still_flagged"))] == 2
    ref = ModerationPipeline(inspector_service.inspector, aligner_service.aligner,
                             PipelineConfig(threshold=0.0, fallback=policy, refusal_text="No.",
                                            max_new_tokens=6)).moderate(q, a)
    for g, r in zip(out, ref):
        assert (g.answer, g.corrected, g.fallback, g.problem) == (r.answer, r.corrected, r.fallback, r.problem)
    # without re-inspection the correction stands, unscored
    flow, calls = _flow(inspector_service, aligner_service, 0.0, fallback=policy, reinspect=False,
                        max_new_tokens=6)
    out = asyncio.run(flow.moderate(q, a))
    assert calls["score"] == 1 and all(o.corrected and o.fallback is None for o in out)


def test_chat_response_gets_final_content_and_moderation_field():
    from pipeline.routing import Moderation

    resp = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "bad"}, "finish_reason": "stop"},
                        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": []}}]}
    m = Moderation(0.9, True, "good", "bad", True, "good", 0.1, None, None, {"total_ms": 3.0})
    out = apply_to_chat_response(resp, {0: m}, 12.345)
    assert out["choices"][0]["message"]["content"] == "good"
    assert out["moderation"]["flagged"] and out["moderation"]["corrected"] and out["moderation"]["upstream_ms"] == 12.35
    assert "original_content" not in out["moderation"]["choices"][0]
    assert "skipped" in out["moderation"]["choices"][1]


@pytest.mark.parametrize("final, fallback", [("good", None), ("Sorry, no.", "fail_closed")])
def test_chat_response_never_carries_the_replaced_upstream_text_unless_exposed(final, fallback):
    """A corrected or refused answer's upstream text appears in no field of the proxy's response
    (not in ``moderation``, not in the choice's logprobs) unless ``expose_original`` is set."""
    from pipeline.routing import Moderation

    def upstream():
        return {"id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "HARMFUL TEXT"},
                             "logprobs": {"content": [{"token": "HARMFUL TEXT", "logprob": -0.1}]},
                             "finish_reason": "stop"}]}

    m = Moderation(0.9, True, final, "HARMFUL TEXT", fallback is None, final, 0.1 if fallback is None else None,
                   fallback, None if fallback is None else "aligner timed out after 1 s")
    assert ServeSettings().expose_original is False
    out = apply_to_chat_response(upstream(), {0: m}, 1.0)
    assert "HARMFUL" not in json.dumps(out)
    assert out["choices"][0]["message"]["content"] == final and out["choices"][0]["logprobs"] is None
    assert out["moderation"]["choices"][0]["fallback"] == fallback
    exposed = apply_to_chat_response(upstream(), {0: m}, 1.0,
                                     expose_original=ServeSettings(expose_original=True).expose_original)
    assert exposed["moderation"]["choices"][0]["original_content"] == "HARMFUL TEXT"
    assert exposed["choices"][0]["message"]["content"] == final and exposed["choices"][0]["logprobs"]
    # an answer left as it came (not flagged, or fail_open) keeps its logprobs: nothing was hidden
    kept = Moderation(0.9, True, "HARMFUL TEXT", "HARMFUL TEXT", False, None, None, "fail_open", "x")
    out = apply_to_chat_response(upstream(), {0: kept}, 1.0)
    assert out["choices"][0]["logprobs"] and "original_content" not in out["moderation"]["choices"][0]


# ----------------------------------------------------------------------------- aligner none, work budgets, health
def test_aligner_none_works_with_the_shipped_deployments_section():
    """``aligner: none`` in serve_config.yaml, deployments section untouched: every entry there
    names a deployment of the built application (a missing one failed the whole app with
    "Deployment 'Aligner' does not exist" and 404s everywhere)."""
    from ray.serve._private.build_app import build_app as serve_build

    from pipeline.serve import build_app

    app_cfg = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())["applications"][0]
    built = serve_build(build_app({**app_cfg["args"], "aligner": "none"}), name="moderation")
    names = {d.name for d in built.deployments}
    assert {d["name"] for d in app_cfg["deployments"]} <= names
    stand_in = next(d for d in built.deployments if d.name == "Aligner")
    assert stand_in.ray_actor_options.get("num_gpus", 0) == 0 and stand_in.ray_actor_options["num_cpus"] == 0


def test_pair_cost_follows_the_inspector_windows():
    assert pair_cost("hi", "hello there") == 1 + 4 + 3            # one window: query + answer + 3 specials
    assert pair_cost("q" * 3000, "a") == 64 + 1 + 3                # the query is cut to 64 tokens
    # longer than an edge window (128 - query - 3 tokens): two edge windows on top
    assert pair_cost("q", "a" * 300) == 1 + 100 + 3                # 100 tokens fit an edge window: none
    assert pair_cost("q", "a" * 450) == 1 + 150 + 3 + 2 * 128
    assert pair_cost("q", "a" * 20000) == 16 * 256 + 2 * 128       # at most 16 full windows
    assert pair_cost("q", "a" * 1500) == 3 * 256 + 2 * 128         # 500 tokens: 3 overlapping windows
    assert pair_cost("q", "a" * 1500, {"edge_length": 0}) == 3 * 256
    assert pair_cost("q", "漢" * 600) > pair_cost("q", "a" * 600)  # one token per non-ASCII character


def test_pair_cost_uses_the_bundled_inspectors_recipe():
    """The ingress estimates cost without loading the model: its recipe copy must be the model's."""
    from inspector import DEFAULT_MODEL_DIR
    from pipeline.admission import DEFAULT_RECIPE

    recipe = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["recipe"]
    assert DEFAULT_RECIPE == {k: recipe.get(k, 0) for k in DEFAULT_RECIPE}


def test_slices_bound_the_work_per_inspector_call():
    pairs = [("q", "a" * 20000)] * 3 + [SAFE] * 100
    slices = slice_pairs(pairs, budget=4096, max_pairs=32)
    assert [p for s, _ in slices for p in s] == pairs              # order kept, nothing lost
    assert all(c <= 4096 and len(s) <= 32 for s, c in slices)
    assert [len(s) for s, _ in slices[:3]] == [1, 1, 1]            # each long pair alone
    assert slice_pairs(pairs[:1], budget=1000, max_pairs=32)[0][1] == 1000  # counted at the budget
    assert sum(c for _, c in slice_pairs([SAFE] * 5, 4096, 32)) == 5 * pair_cost(*SAFE)


def test_admission_refuses_too_large_requests_and_sheds_beyond_capacity():
    gate = Admission(capacity_tokens=1000, max_request_tokens=1500, drain_tokens_per_s=100)
    with pytest.raises(RequestError) as e:
        gate.check_size(1501)
    assert e.value.status == 413 and "limit per request is 1500" in e.value.detail
    with gate.admit(600):
        with gate.admit(400):
            with pytest.raises(StageError) as e:
                gate.admit(1)
            assert e.value.status == 503 and e.value.retry_after_s >= 1 and "retry later" in e.value.detail
        assert gate.outstanding == 600
    assert gate.outstanding == 0
    with gate.admit(1500):                                         # above capacity: only when idle
        with pytest.raises(StageError):
            gate.admit(10)
    try:
        with gate.admit(100):
            raise RuntimeError("the request failed")
    except RuntimeError:
        pass
    assert gate.outstanding == 0 and gate.state()["refused"] == 2
    # a streamed request: refused at once when there is no room, holding nothing; its checks are
    # counted while they run but never refused (shedding one would cut an answer half-way)
    with gate.admit(900):
        with pytest.raises(StageError) as e:
            gate.ensure_room(200)
        assert e.value.status == 503 and gate.outstanding == 900
        gate.ensure_room(100)
        assert gate.outstanding == 900
        with gate.admit(500, force=True):
            assert gate.outstanding == 1400
    assert gate.outstanding == 0 and gate.state()["refused"] == 3


def test_recent_outcomes_tell_when_the_inspector_does_not_answer():
    now = [0.0]
    recent = RecentOutcomes(window_s=30, min_calls=5, max_failure_share=0.5, clock=lambda: now[0])
    for _ in range(4):
        recent.record(False, "timed out after 5 s")
    assert recent.verdict() is None                                # too few calls to judge
    recent.record(True)
    recent.record(False, "timed out after 5 s")
    v = recent.verdict()
    assert v and "failed 5 of its last 6 calls" in v and "timed out" in v
    now[0] = 31.0                                                  # old failures age out
    recent.record(True)
    assert recent.verdict() is None and recent.summary()["calls"] == 1


def test_queue_limits_and_request_timeout_are_derived_from_the_settings():
    s = ServeSettings()
    cap = s.inspector_capacity_tokens()
    assert cap == int(s.inspector_tokens_per_s * s.inspector_timeout_s * 0.5)
    ongoing, queued = s.ingress_limits()
    assert (ongoing + queued) * 128 <= cap + 128 and ongoing >= 1 and queued >= 1
    assert s.request_token_budget() == cap
    assert s.effective_request_timeout_s() == 2 * s.inspector_timeout_s + s.aligner_timeout_s + 5
    assert ServeSettings(aligner=None, inspector_timeout_s=2).effective_request_timeout_s() == 9
    two = ServeSettings(inspector_replicas=2)
    assert two.inspector_capacity_tokens() == 2 * cap and sum(two.ingress_limits()) > ongoing + queued
    assert ServeSettings(max_ongoing_requests=3, max_queued_requests=-1).ingress_limits() == (3, -1)
    with pytest.raises(ValidationError, match="request_timeout_s"):
        ServeSettings(request_timeout_s=5, inspector_timeout_s=10)
    # the body (256 items x 20,000 characters) is far above the default budget: 413 at once
    assert 256 * pair_cost("q" * 20000, "a" * 20000) > s.request_token_budget()


def test_a_full_list_of_chat_pairs_fits_the_work_budget():
    """max_items follows the work budget (both defaults and the shipped config): a list of max_items
    typical chat pairs (the example logs' mean cost) is admitted, so the limit a client meets with
    chat-sized pairs is the item count, named in a 413."""
    rows = [json.loads(line) for line in (REPO_ROOT / "examples" / "chat_logs.jsonl").read_text().splitlines()]
    costs = [pair_cost(r["query"], r["answer"]) for r in rows
             if isinstance(r.get("query"), str) and isinstance(r.get("answer"), str)]
    assert len(costs) >= 20
    typical = sum(costs) / len(costs)
    shipped = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    for s in (ServeSettings(), ServeSettings.model_validate(shipped)):
        assert s.max_items * typical <= s.request_token_budget(), (s.max_items, typical, s.request_token_budget())
        body = json.dumps([{"query": "q", "answer": "a"}] * (s.max_items + 1)).encode()
        with pytest.raises(RequestError) as e:
            parse_moderate_body(body, s.max_items, s.max_chars)
        assert e.value.status == 413
        assert f"{s.max_items + 1} items in one request; the limit is {s.max_items} (max_items)" in e.value.detail
        full = json.dumps([{"query": "q", "answer": "a"}] * s.max_items).encode()
        assert len(parse_moderate_body(full, s.max_items, s.max_chars)[1]) == s.max_items


def test_errors_are_answered_by_the_apps_exception_handlers():
    """Endpoints raise; the handlers answer every error in one shape: {"detail"}, the status, and
    Retry-After for a shed request; the upstream's 4xx goes back as it came."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.http import ApiError, UpstreamRefused, add_error_handlers

    app = FastAPI()
    add_error_handlers(app)
    raised = {"bad": RequestError(422, "field 'answer' is missing"),
              "shed": StageError("admission", "overloaded: retry later", retry_after_s=3),
              "down": StageError("inspector", "inspector timed out after 5 s"),
              "late": ApiError(504, "the request took longer than request_timeout_s (30 s)"),
              "refused": UpstreamRefused(401, {"error": {"message": "bad key"}})}

    @app.get("/{what}")
    async def fail(what: str):
        raise raised[what]

    client = TestClient(app)
    for what, status, body in (("bad", 422, {"detail": "field 'answer' is missing"}),
                               ("shed", 503, {"detail": "overloaded: retry later"}),
                               ("down", 503, {"detail": "inspector timed out after 5 s"}),
                               ("late", 504, {"detail": "the request took longer than request_timeout_s (30 s)"}),
                               ("refused", 401, {"error": {"message": "bad key"}})):
        r = client.get(f"/{what}")
        assert (r.status_code, r.json()) == (status, body), what
        assert r.headers.get("retry-after") == ("3" if what == "shed" else None), what


def test_inspector_embedder_follows_resolve_embedders_rule(tmp_path):
    """Only resolve_embedder's packaged name counts as packaged; any other packaged:* name cannot
    load (it is not a folder, nor a hub id) and fails the build with a clear message."""
    from inspector import DEFAULT_MODEL_DIR
    from inspector.encoder import DEFAULT_EMBEDDER

    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    for embedder in (DEFAULT_EMBEDDER, None):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "embedder": embedder}))
        resolve_settings({"inspector": str(tmp_path), "aligner": "none"})
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "embedder": "packaged:all-mpnet-base-v2"}))
    with pytest.raises(ValueError, match="'packaged:all-mpnet-base-v2'.*not a packaged model.*"
                                         "'packaged:all-MiniLM-L6-v2'"):
        resolve_settings({"inspector": str(tmp_path), "aligner": "none"})
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "embedder": str(tmp_path / "no-such-folder")}))
    with pytest.raises(ValueError, match="no-such-folder.*is missing"):
        resolve_settings({"inspector": str(tmp_path), "aligner": "none"})
