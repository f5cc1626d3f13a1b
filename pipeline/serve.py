"""Ray Serve deployment of the moderation pipeline: ``serve run pipeline.serve:app``.

Three deployments, composed through DeploymentHandles:

- ``Inspector`` (CPU, ``@serve.batch``): scores every (query, answer) pair;
- ``Aligner`` (``num_gpus`` from the config, ``@serve.batch``, batched generation): rewrites only
  the pairs the inspector flagged; absent when no aligner is configured or found;
- ``Moderator``: the FastAPI ingress. ``POST /v1/moderate``, ``POST /v1/chat/completions`` (an
  OpenAI-compatible proxy in front of ``upstream_url``; ``"stream": true`` streams the answer
  through the inspector gate, ``pipeline.streaming.StreamGate``) and ``GET /healthz``. Its decision
  is ``pipeline.flow.ModerationFlow``: ``pipeline.core.moderate``, the same code as
  ``python -m pipeline.batch``. Errors are raised (``pipeline.http.ApiError``) and answered by the
  app's exception handlers, in one shape.

The plain-Python parts, testable without Ray: ``pipeline.settings`` (``ServeSettings``,
``resolve_settings``), ``pipeline.services`` (what the model deployments run),
``pipeline.admission`` (work budgets), ``pipeline.http`` (bodies, errors, JSON out),
``pipeline.metrics`` and ``pipeline.flow``.

Configure with ``serve run pipeline.serve:build_app threshold=0.4 aligner=none`` or with the
``args:`` of a Serve config (see ``serve_config.yaml``). Overload: the ingress admits scoring work
(estimated tokens, ``admission.pair_cost``) up to what the inspector drains within
``inspector_timeout_s`` and answers 503 + Retry-After at once beyond it; a request above the
per-request budget answers 413; requests beyond the ingress's ``max_ongoing_requests`` +
``max_queued_requests`` (derived from the same capacity) answer 503 at once; every request has
the ingress's own ``request_timeout_s`` (504). A large request is scored in slices of at most
``inspector_batch_tokens``, so others are served in between. An aligner that is missing, fails,
is overloaded or exceeds ``aligner_timeout_s`` triggers the fallback policy.
"""
# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type.
import asyncio
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from aligner.results import CorrectionResult, Reason

from .admission import Admission, pair_cost, slice_pairs
from .env import offline_by_default
from .flow import ModerationFlow
from .http import (ApiError, RequestError, StageError, UpstreamRefused, add_error_handlers, apply_to_chat_response,
                   message_text, moderation_json, parse_chat_body, parse_moderate_body, short_error)
from .metrics import PipelineMetrics, RecentOutcomes
from .services import AlignerService, InspectorService
from .settings import ServeSettings, resolve_settings
from .streaming import StreamGate, UpstreamStream

logger = logging.getLogger("ray.serve")


def _pair_count(chunks: list) -> int:
    """Batch size in pairs: each call carries a chunk (list) of pairs from one request."""
    return sum(len(c) for c in chunks)


def _slice_cost(slices: list) -> int:
    """Batch size in estimated tokens: each call carries one slice ``(pairs, cost)``."""
    return sum(c for _, c in slices)


def _split(flat: list, chunks: list) -> list[list]:
    out, k = [], 0
    for c in chunks:
        out.append(flat[k:k + len(c)])
        k += len(c)
    return out


async def _call(response, timeout_s: float):
    """Await a DeploymentResponse with a deadline; on timeout the request is cancelled."""
    async def wait():
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):  # cancelled: the caller gave up (deadline, client)
        response.cancel()
        raise


# ----------------------------------------------------------------------------- model deployments
@serve.deployment(name="Inspector", max_ongoing_requests=64)
class InspectorDeployment:
    """CPU scorer. Each call is one slice ``(pairs, estimated tokens)`` of at most
    ``inspector_batch_tokens`` (the ingress slices requests, ``admission.slice_pairs``); slices
    from concurrent requests are batched up to that many tokens, so one scoring thread call (which
    cannot be interrupted) is bounded, and a slice whose request was cancelled while it queued is
    never scored (``serve.batch`` drops cancelled calls)."""

    def __init__(self, settings: dict):
        s = ServeSettings.model_validate(settings)
        if not s.download_models:
            offline_by_default()
        self.service = InspectorService(s.inspector, s.torch_threads, s.inspector_int8)
        self.score.set_max_batch_size(s.inspector_batch_tokens)
        self.score.set_batch_wait_timeout_s(s.inspector_batch_wait_s)

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.005, batch_size_fn=_slice_cost)
    async def score(self, slices: list[tuple[list[tuple[str, str]], int]]) -> list[list]:
        chunks = [pairs for pairs, _ in slices]
        flat = [p for c in chunks for p in c]
        return _split(await asyncio.to_thread(self.service.score_pairs, flat), chunks)

    def info(self) -> dict:
        return self.service.info()


@serve.deployment(name="Aligner", max_ongoing_requests=16)
class AlignerDeployment:
    """The correction model (GPU in production); flagged pairs from concurrent requests are
    generated together, within ``aligner_timeout_s``."""

    def __init__(self, settings: dict):
        s = ServeSettings.model_validate(settings)
        if not s.download_models:
            offline_by_default()
        self.service = AlignerService(s.aligner, s.aligner_device, s.generation_kwargs(), s.aligner_timeout_s,
                                      s.aligner_max_batch_size, s.torch_threads)
        self.correct.set_max_batch_size(s.aligner_max_batch_size)
        self.correct.set_batch_wait_timeout_s(s.aligner_batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_pair_count)
    async def correct(self, chunks: list[list[tuple[str, str]]]) -> list[list[CorrectionResult]]:
        flat = [p for c in chunks for p in c]
        return _split(await asyncio.to_thread(self.service.correct_pairs, flat), chunks)

    def info(self) -> dict:
        return self.service.info()


@serve.deployment(name="Aligner", max_ongoing_requests=1)
class DisabledAligner:
    """Stands in for the Aligner deployment when ``aligner`` is none, so that a Serve config's
    ``deployments:`` entry named Aligner still applies (to this idle, CPU-less, GPU-less
    replica) instead of failing the whole application. The ingress never calls it."""

    def __init__(self, note: str | None = None):
        self.note = note

    def info(self) -> dict:
        return {"status": "absent", "detail": self.note}


# ----------------------------------------------------------------------------- the ingress
api = FastAPI(title="Moderation pipeline", version="1",
              description="Inspector-gated aligner: every answer is scored, only flagged ones are rewritten.")
add_error_handlers(api)  # ApiError -> {"detail"} with its status (and Retry-After); an upstream 4xx as it came


def _error_stage(exc: ApiError) -> str | None:
    """The ``errors_total{stage}`` label of a request that ended with ``exc``; None where the step
    that failed counted it already (``ModerationFlow`` counts the inspector's failures)."""
    if isinstance(exc, StageError):
        return "shed" if exc.stage == "admission" else None
    return "upstream" if exc.status in (502, 504) else "bad_request"


class _GatedStream(StreamingResponse):
    """The gate's server-sent events. However the response ends (done, error event, the client
    gone: Serve cancels the request), the gate is closed, which closes the upstream request."""

    def __init__(self, first: str, gate: StreamGate, events, on_end):
        async def body():
            yield first
            async for ev in events:
                yield ev

        super().__init__(body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_end, self.gate = events, on_end, gate

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.events.aclose()
            finally:
                self.on_end(self.gate)


SLICES_IN_FLIGHT = 2  # per request: others' slices queue between a large request's slices
PROBE = [("health probe", "ok")]


@serve.deployment(name="Moderator", max_ongoing_requests=64)
@serve.ingress(api)
class Moderator:
    def __init__(self, inspector, aligner, settings: dict, aligner_note: str | None = None,
                 disabled_aligner=None):
        self.settings = s = ServeSettings.model_validate(settings)
        self.inspector, self.aligner, self.aligner_note = inspector, aligner, aligner_note
        self.metrics = PipelineMetrics(export=True)
        self.admission = Admission(s.inspector_capacity_tokens(), s.request_token_budget(),
                                   s.inspector_tokens_per_s * (s.inspector_replicas or 1))
        self.recent = RecentOutcomes()
        self.request_timeout_s = s.effective_request_timeout_s()
        self.flow = ModerationFlow(self.settings, self._score, self._correct if aligner is not None else None,
                                   self._threshold, self.metrics)
        self._stored_threshold: float | None = None
        self._client = None
        if self.settings.upstream_url is not None:
            import httpx

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.upstream_timeout_s))

    # -- calls to the model deployments -----------------------------------------------------------
    async def _score(self, queries: list[str], answers: list[str]) -> list:
        """Score in slices of at most ``inspector_batch_tokens`` estimated tokens, at most
        ``SLICES_IN_FLIGHT`` at a time, all within one ``inspector_timeout_s`` deadline: a large
        request never holds the inspector for more than a slice while others wait, and once it
        times out (or its client goes away) its remaining slices are never sent or are cancelled."""
        s = self.settings
        slices = slice_pairs(list(zip(queries, answers)), s.inspector_batch_tokens, s.inspector_max_batch_size)
        deadline = time.monotonic() + s.inspector_timeout_s
        parts: list = [None] * len(slices)
        todo = iter(range(len(slices)))

        async def worker():
            for i in todo:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                parts[i] = await _call(self.inspector.score.remote(slices[i]), left)
                self.recent.record(True)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(SLICES_IN_FLIGHT, len(slices)))]
        try:
            await asyncio.gather(*tasks)
        except asyncio.TimeoutError:
            self.recent.record(False, f"timed out after {s.inspector_timeout_s} s")
            raise StageError("inspector", f"inspector timed out after {s.inspector_timeout_s} s") from None
        except BackPressureError:
            self.recent.record(False, "overloaded (max_queued_requests reached)")
            raise StageError("inspector", "inspector overloaded (max_queued_requests reached); retry later") from None
        except Exception as exc:  # noqa: BLE001 - reported as 503, the server stays up
            self.recent.record(False, f"unavailable: {short_error(exc)}")
            raise StageError("inspector", f"inspector unavailable: {short_error(exc)}") from None
        finally:
            for t in tasks:
                t.cancel()
        return [x for p in parts for x in p]  # PairScores: a pair that failed fails alone

    async def _correct(self, queries: list[str], answers: list[str]) -> list[CorrectionResult]:
        s = self.settings
        pairs = list(zip(queries, answers))
        n = s.aligner_max_batch_size

        async def one(chunk):
            try:
                return await _call(self.aligner.correct.remote(chunk), s.aligner_timeout_s)
            except asyncio.TimeoutError:
                reason, problem = Reason.TIMEOUT, f"aligner timed out after {s.aligner_timeout_s} s"
            except BackPressureError:
                reason, problem = Reason.OVERLOADED, "aligner overloaded (max_queued_requests reached)"
            except Exception as exc:  # noqa: BLE001 - the fallback policy applies
                reason, problem = Reason.ALIGNER_ERROR, f"aligner error: {short_error(exc)}"
            return [CorrectionResult.failed(reason, problem) for _ in chunk]

        parts = await asyncio.gather(*[one(pairs[k:k + n]) for k in range(0, len(pairs), n)])
        return [r for p in parts for r in p]

    async def _threshold(self) -> float:
        if self.settings.threshold is not None:
            return float(self.settings.threshold)
        if self._stored_threshold is None:
            info = await self._inspector_info(self.settings.inspector_timeout_s)
            self._stored_threshold = float(info["threshold"])
        return self._stored_threshold

    async def _inspector_info(self, timeout_s: float) -> dict:
        try:
            return await _call(self.inspector.info.remote(), timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise StageError("inspector", f"inspector unavailable: {short_error(exc)}") from None

    # -- endpoints ----------------------------------------------------------------------------------
    async def _served(self, work, ctx: dict):
        """An endpoint's ``work`` within ``request_timeout_s`` (504 past it), counted under
        ``ctx["endpoint"]`` (set to None by a stream, counted when it ends). A failure is raised on
        to the app's exception handlers (``pipeline.http.add_error_handlers``), which answer it;
        anything unexpected becomes a 500, and one request never takes the server down."""
        t0, status = time.perf_counter(), 200
        try:
            out = await asyncio.wait_for(work, self.request_timeout_s)
            if isinstance(out, _GatedStream):  # counted when the stream ends
                ctx["endpoint"] = None
            return out
        except asyncio.TimeoutError:
            status = 504
            self.metrics.error("timeout")
            raise ApiError(504, f"the request took longer than request_timeout_s ({self.request_timeout_s} s)") from None
        except ApiError as exc:
            status = exc.status
            stage = _error_stage(exc)
            if stage:
                self.metrics.error(stage)
            raise
        except UpstreamRefused as exc:  # the client's own mistake upstream (auth, model name...)
            status = exc.status
            raise
        except Exception as exc:  # noqa: BLE001 - answered 500, the server stays up
            status = 500
            self.metrics.error("internal")
            logger.exception("%s failed", ctx["endpoint"])
            raise ApiError(500, f"internal error: {short_error(exc)}") from None
        finally:
            if ctx["endpoint"] is not None:
                self.metrics.request(ctx["endpoint"], status, (time.perf_counter() - t0) * 1e3)

    @api.get("/healthz")
    async def healthz(self):
        """Ready when the inspector scores: a one-pair probe through the same batch queue as the
        traffic must answer within ``min(5 s, inspector_timeout_s)``, and most of its recent calls
        must have succeeded; else 503 with the reason. 'degraded' when the aligner does not answer
        (the fallback applies)."""
        probe_s = min(5.0, self.settings.inspector_timeout_s)
        verdict = self.recent.verdict()
        if verdict:
            raise StageError("health", f"inspector not answering: {verdict}")
        info = await self._inspector_info(probe_s)  # StageError (503) when it does not answer
        t0 = time.perf_counter()
        try:
            await _call(self.inspector.score.remote((PROBE, pair_cost(*PROBE[0]))), probe_s)
        except asyncio.TimeoutError:
            raise StageError("health", f"inspector not answering: a one-pair probe got no score within "
                                       f"{probe_s} s (stalled or overloaded)") from None
        except Exception as exc:  # noqa: BLE001
            raise StageError("health", f"inspector not answering: the probe failed: {short_error(exc)}") from None
        info = {**info, "probe_ms": round((time.perf_counter() - t0) * 1e3, 1), "recent": self.recent.summary(),
                "admission": self.admission.state()}
        threshold = self.settings.threshold if self.settings.threshold is not None else info["threshold"]
        status, aligner = "ok", {"status": "absent", "detail": self.aligner_note}
        if self.aligner is not None:
            try:
                aligner = {"status": "ok", **await _call(self.aligner.info.remote(), 5.0)}
            except Exception as exc:  # noqa: BLE001
                status, aligner = "degraded", {"status": "unavailable", "detail": short_error(exc)}
        return {"status": status, "threshold": threshold, "fallback": self.settings.fallback,
                "inspector": info, "aligner": aligner,
                "chat_proxy": self.settings.upstream_url is not None}

    @api.post("/v1/moderate")
    async def moderate(self, request: Request):
        """One ``{query, answer}`` -> one result; a list -> ``{"results": [...]}`` in input order,
        where an invalid item gets ``{"index", "error"}`` and the others are moderated."""
        return await self._served(self._moderate(request), {"endpoint": "moderate"})

    async def _moderated(self, queries: list[str], answers: list[str], endpoint: str):
        """The flow behind the work budget: 413 above the per-request budget, 503 at once when
        the scoring work already admitted leaves no room for this request within its budget."""
        cost = sum(pair_cost(q, a) for q, a in zip(queries, answers))
        self.admission.check_size(cost)
        with self.admission.admit(cost):
            out = await self.flow.moderate(queries, answers, endpoint)
        bad = [f"pair {i}: {m.error}" for i, m in enumerate(out) if m.error is not None]
        if bad and endpoint == "chat":  # an unscored answer is never passed on
            raise StageError("inspector", "; ".join(bad[:3]), status=422)
        return out

    async def _moderate(self, request: Request):
        s = self.settings
        is_list, items = parse_moderate_body(await request.body(), s.max_items, s.max_chars)
        good = [it for it in items if it.error is None]
        if len(good) < len(items):
            self.metrics.error("bad_request", len(items) - len(good))
        results = await self._moderated([it.query for it in good], [it.answer for it in good],
                                        "moderate") if good else []
        if not is_list:
            if results[0].error is not None:
                raise RequestError(422, results[0].error)
            return moderation_json(results[0])
        by_index = {it.index: r for it, r in zip(good, results)}
        for it in good:  # a pair the inspector could not score fails alone
            if by_index[it.index].error is not None:
                it.error = f"item {it.index}: {by_index[it.index].error}"
        return {"results": [moderation_json(by_index[it.index], it.index) if it.error is None
                            else {"index": it.index, "error": it.error} for it in items]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """Forward an OpenAI chat completion request upstream, moderate each returned assistant
        message against the last user turn, return the upstream's answer with the final content
        and a ``moderation`` field. ``"stream": true``: server-sent ``chat.completion.chunk``
        events, each text released after a passing check (``pipeline.streaming``)."""
        ctx = {"endpoint": "chat"}
        return await self._served(self._chat(request, time.perf_counter(), ctx), ctx)

    async def _chat(self, request: Request, t0: float, ctx: dict):
        import httpx

        s = self.settings
        if s.upstream_url is None:
            raise RequestError(501, "the chat proxy is off: set upstream_url in the config")
        body, query = parse_chat_body(await request.body(), s.max_chars)
        headers = {}
        key = os.environ.get(s.upstream_api_key_env) if s.upstream_api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif request.headers.get("authorization"):
            headers["Authorization"] = request.headers["authorization"]
        url = s.upstream_url.rstrip("/") + "/chat/completions"
        if body.get("stream"):
            ctx["endpoint"] = "chat_stream"
            return await self._chat_stream(body, query, url, headers, t0)
        t_up = time.perf_counter()
        try:
            r = await self._client.post(url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise RequestError(504, f"upstream timed out after {s.upstream_timeout_s} s ({url})") from None
        except httpx.HTTPError as exc:
            raise RequestError(502, f"upstream unreachable ({url}): {short_error(exc)}") from None
        upstream_ms = (time.perf_counter() - t_up) * 1e3
        self.metrics.latency("upstream", upstream_ms)
        if r.status_code >= 500:
            raise RequestError(502, f"upstream returned {r.status_code}: {r.text[:300]}")
        if r.status_code >= 400:  # the client's own mistake (auth, model name...): pass it through
            try:
                content: Any = r.json()
            except ValueError:
                content = {"detail": r.text[:1000]}
            raise UpstreamRefused(r.status_code, content)
        try:
            resp = r.json()
        except ValueError:
            raise RequestError(502, f"upstream answer is not JSON: {r.text[:200]!r}") from None
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list):
            raise RequestError(502, "upstream answer has no 'choices' list")
        texts: dict[int, str] = {}
        for i, ch in enumerate(choices):
            msg = ch.get("message") if isinstance(ch, dict) else None
            text = message_text(msg.get("content")) if isinstance(msg, dict) else None
            if text is not None and text.strip():
                texts[i] = text
        results: dict[int, Any] = {}
        if texts:
            mods = await self._moderated([query] * len(texts), list(texts.values()), "chat")
            results = dict(zip(texts, mods))
        return apply_to_chat_response(resp, results, upstream_ms, expose_original=s.expose_original)

    async def _chat_stream(self, body: dict, query: str, url: str, headers: dict, t0: float):
        """Run the gate up to its first event here, so that every failure before any text is a
        plain HTTP answer (503 overload or inspector, 502/504 upstream, the upstream's 4xx as it
        came); then stream the rest."""
        s = self.settings
        upstream = UpstreamStream(self._client, url, body, headers, s.upstream_timeout_s)
        gate = StreamGate(self.flow, query, upstream, s, admission=self.admission, model=body.get("model"),
                          started=t0)
        events = gate.events()
        try:
            first = await events.__anext__()
        except BaseException:  # a plain HTTP answer: an ApiError, or the upstream's 4xx as it came
            await events.aclose()
            raise
        finally:
            if upstream.upstream_ms is not None:
                self.metrics.latency("upstream", upstream.upstream_ms)

        def on_end(g: StreamGate):
            rep = g.report
            if rep.finish_reason is None and rep.error is None:  # the client went away first
                self.metrics.error("client_disconnect")
            self.metrics.request("chat_stream", 200, (time.perf_counter() - t0) * 1e3)

        return _GatedStream(first, gate, events, on_end)


# ----------------------------------------------------------------------------- the application
def build_app(args: dict | ServeSettings | None = None):
    """The application for ``serve run pipeline.serve:build_app k=v ...`` and for a Serve
    config's ``import_path`` + ``args``. Paths are resolved here, so a missing model fails the
    deployment at once with a clear message instead of in a replica restart loop."""
    s, note = resolve_settings(args)
    if note:
        logger.warning("no aligner: %s; flagged answers get the %s fallback", note, s.fallback)
    d = s.model_dump()
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.inspector_num_cpus},
                            "max_ongoing_requests": max(2 * s.inspector_max_batch_size, 16)}
    if s.inspector_replicas:
        opts["num_replicas"] = s.inspector_replicas
    inspector = InspectorDeployment.options(**opts).bind(d)
    aligner = disabled = None
    if s.aligner:
        opts = {"ray_actor_options": {"num_cpus": s.aligner_num_cpus, "num_gpus": s.aligner_num_gpus},
                "max_ongoing_requests": max(2 * s.aligner_max_batch_size, 8)}
        if s.aligner_replicas:
            opts["num_replicas"] = s.aligner_replicas
        aligner = AlignerDeployment.options(**opts).bind(d)
    else:  # a Serve config's `deployments: - name: Aligner` entry still has a deployment to apply to
        disabled = DisabledAligner.options(ray_actor_options={"num_cpus": 0}).bind(note)
    ongoing, queued = s.ingress_limits()
    return Moderator.options(ray_actor_options={"num_cpus": s.ingress_num_cpus},
                             num_replicas=s.ingress_replicas, max_ongoing_requests=ongoing,
                             max_queued_requests=queued).bind(inspector, aligner, d, note, disabled)


def __getattr__(name: str):
    """``pipeline.serve:app`` is built on first access, with the defaults, so importing this
    module (as every replica does) loads nothing and checks nothing."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
