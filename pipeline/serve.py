"""Ray Serve deployment of the moderation pipeline: ``serve run pipeline.serve:app``.

Three deployments, composed through DeploymentHandles:

- ``Inspector`` (CPU, ``@serve.batch``): scores every (query, answer) pair;
- ``Aligner`` (``num_gpus`` from the config, ``@serve.batch``, batched generation): rewrites only
  the pairs the inspector flagged; absent when no aligner is configured or found;
- ``Moderator``: the FastAPI ingress. ``POST /v1/moderate``, ``POST /v1/chat/completions`` (an
  OpenAI-compatible proxy in front of ``upstream_url``) and ``GET /healthz``. Its decision is
  ``serve_core.ModerationFlow``: ``pipeline.routing.route`` and the fallback policy, the same
  code as ``python -m pipeline.batch``.

Configure with ``serve run pipeline.serve:build_app threshold=0.4 aligner=none`` or with the
``args:`` of a Serve config (see ``serve_config.yaml``). Overload: requests beyond the ingress's
``max_ongoing_requests`` + ``max_queued_requests`` answer 503 at once; an aligner that is missing,
fails, is overloaded or exceeds ``aligner_timeout_s`` triggers the fallback policy.
"""
# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type.
import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from aligner.model import CorrectionResult

from .serve_core import (AlignerService, InspectorService, ModerationFlow, PipelineMetrics, RequestError,
                         ServeSettings, StageError, apply_to_chat_response, message_text, moderation_json,
                         parse_chat_body, parse_moderate_body, resolve_settings)

logger = logging.getLogger("ray.serve")


def _pair_count(chunks: list) -> int:
    """Batch size in pairs: each call carries a chunk (list) of pairs from one request."""
    return sum(len(c) for c in chunks)


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
    except asyncio.TimeoutError:
        response.cancel()
        raise


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:limit]


# ----------------------------------------------------------------------------- model deployments
@serve.deployment(name="Inspector", max_ongoing_requests=64)
class InspectorDeployment:
    """CPU scorer; pairs from concurrent requests are scored together."""

    def __init__(self, settings: dict):
        s = ServeSettings.model_validate(settings)
        self.service = InspectorService(s.inspector, s.torch_threads, s.inspector_int8)
        self.score.set_max_batch_size(s.inspector_max_batch_size)
        self.score.set_batch_wait_timeout_s(s.inspector_batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_pair_count)
    async def score(self, chunks: list[list[tuple[str, str]]]) -> list[list]:
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


# ----------------------------------------------------------------------------- the ingress
api = FastAPI(title="Moderation pipeline", version="1",
              description="Inspector-gated aligner: every answer is scored, only flagged ones are rewritten.")


class _Passthrough(Exception):
    """An upstream 4xx answer (bad key, unknown model...) returned to the client as it came."""

    def __init__(self, response: JSONResponse):
        self.response = response


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


@serve.deployment(name="Moderator", max_ongoing_requests=64)
@serve.ingress(api)
class Moderator:
    def __init__(self, inspector, aligner, settings: dict, aligner_note: str | None = None):
        self.settings = ServeSettings.model_validate(settings)
        self.inspector, self.aligner, self.aligner_note = inspector, aligner, aligner_note
        self.metrics = PipelineMetrics(export=True)
        self.flow = ModerationFlow(self.settings, self._score, self._correct if aligner is not None else None,
                                   self._threshold, self.metrics)
        self._stored_threshold: float | None = None
        self._client = None
        if self.settings.upstream_url is not None:
            import httpx

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.upstream_timeout_s))

    # -- calls to the model deployments -----------------------------------------------------------
    async def _score(self, queries: list[str], answers: list[str]) -> np.ndarray:
        s = self.settings
        pairs = list(zip(queries, answers))
        n = s.inspector_max_batch_size
        calls = [_call(self.inspector.score.remote(pairs[k:k + n]), s.inspector_timeout_s)
                 for k in range(0, len(pairs), n)]
        try:
            parts = await asyncio.gather(*calls)
        except asyncio.TimeoutError:
            raise StageError("inspector", f"inspector timed out after {s.inspector_timeout_s} s") from None
        except BackPressureError:
            raise StageError("inspector", "inspector overloaded (max_queued_requests reached); retry later") from None
        except Exception as exc:  # noqa: BLE001 - reported as 503, the server stays up
            raise StageError("inspector", f"inspector unavailable: {_short(exc)}") from None
        flat = [x for p in parts for x in p]
        bad = [f"pair {i}: {x.error}" for i, x in enumerate(flat) if x.error]
        if bad:  # the ingress validates first, so this means the two checks disagree
            raise StageError("inspector", "; ".join(bad[:3]), status=422)
        return np.array([x.score for x in flat], dtype=float)

    async def _correct(self, queries: list[str], answers: list[str]) -> list[CorrectionResult]:
        s = self.settings
        pairs = list(zip(queries, answers))
        n = s.aligner_max_batch_size

        async def one(chunk):
            try:
                return await _call(self.aligner.correct.remote(chunk), s.aligner_timeout_s)
            except asyncio.TimeoutError:
                problem = f"aligner timed out after {s.aligner_timeout_s} s"
            except BackPressureError:
                problem = "aligner overloaded (max_queued_requests reached)"
            except Exception as exc:  # noqa: BLE001 - the fallback policy applies
                problem = f"aligner error: {_short(exc)}"
            return [CorrectionResult("", False, problem) for _ in chunk]

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
            raise StageError("inspector", f"inspector unavailable: {_short(exc)}") from None

    # -- endpoints ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        """Ready when the inspector answers; 'degraded' when the aligner does not (fallback applies)."""
        try:
            info = await self._inspector_info(min(5.0, self.settings.inspector_timeout_s))
        except StageError as exc:
            return _error(503, exc.detail)
        threshold = self.settings.threshold if self.settings.threshold is not None else info["threshold"]
        status, aligner = "ok", {"status": "absent", "detail": self.aligner_note}
        if self.aligner is not None:
            try:
                aligner = {"status": "ok", **await _call(self.aligner.info.remote(), 5.0)}
            except Exception as exc:  # noqa: BLE001
                status, aligner = "degraded", {"status": "unavailable", "detail": _short(exc)}
        return {"status": status, "threshold": threshold, "fallback": self.settings.fallback,
                "inspector": info, "aligner": aligner,
                "chat_proxy": self.settings.upstream_url is not None}

    @api.post("/v1/moderate")
    async def moderate(self, request: Request):
        """One ``{query, answer}`` -> one result; a list -> ``{"results": [...]}`` in input order,
        where an invalid item gets ``{"index", "error"}`` and the others are moderated."""
        t0, status = time.perf_counter(), 200
        try:
            s = self.settings
            is_list, items = parse_moderate_body(await request.body(), s.max_items, s.max_chars)
            good = [it for it in items if it.error is None]
            if len(good) < len(items):
                self.metrics.error("bad_request", len(items) - len(good))
            results = await self.flow.moderate([it.query for it in good], [it.answer for it in good],
                                               "moderate") if good else []
            if not is_list:
                return moderation_json(results[0])
            by_index = {it.index: r for it, r in zip(good, results)}
            return {"results": [moderation_json(by_index[it.index], it.index) if it.error is None
                                else {"index": it.index, "error": it.error} for it in items]}
        except RequestError as exc:
            status = exc.status
            self.metrics.error("bad_request")
            return _error(status, exc.detail)
        except StageError as exc:
            status = exc.status
            return _error(status, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one request never takes the server down
            status = 500
            self.metrics.error("internal")
            logger.exception("moderate failed")
            return _error(500, f"internal error: {_short(exc)}")
        finally:
            self.metrics.request("moderate", status, (time.perf_counter() - t0) * 1e3)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """Forward an OpenAI chat completion request upstream, moderate each returned assistant
        message against the last user turn, return the upstream's answer with the final content
        and a ``moderation`` field."""
        t0, status = time.perf_counter(), 200
        try:
            return await self._chat(request)
        except RequestError as exc:
            status = exc.status
            self.metrics.error("upstream" if status in (502, 504) else "bad_request")
            return _error(status, exc.detail)
        except StageError as exc:
            status = exc.status
            return _error(status, exc.detail)
        except _Passthrough as exc:
            status = exc.response.status_code
            return exc.response
        except Exception as exc:  # noqa: BLE001
            status = 500
            self.metrics.error("internal")
            logger.exception("chat proxy failed")
            return _error(500, f"internal error: {_short(exc)}")
        finally:
            self.metrics.request("chat", status, (time.perf_counter() - t0) * 1e3)

    async def _chat(self, request: Request) -> dict:
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
        t_up = time.perf_counter()
        try:
            r = await self._client.post(url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise RequestError(504, f"upstream timed out after {s.upstream_timeout_s} s ({url})") from None
        except httpx.HTTPError as exc:
            raise RequestError(502, f"upstream unreachable ({url}): {_short(exc)}") from None
        upstream_ms = (time.perf_counter() - t_up) * 1e3
        self.metrics.latency("upstream", upstream_ms)
        if r.status_code >= 500:
            raise RequestError(502, f"upstream returned {r.status_code}: {r.text[:300]}")
        if r.status_code >= 400:  # the client's own mistake (auth, model name...): pass it through
            try:
                content: Any = r.json()
            except ValueError:
                content = {"detail": r.text[:1000]}
            raise _Passthrough(JSONResponse(content, status_code=r.status_code))
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
            mods = await self.flow.moderate([query] * len(texts), list(texts.values()), "chat")
            results = dict(zip(texts, mods))
        return apply_to_chat_response(resp, results, upstream_ms, expose_original=s.expose_original)


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
    aligner = None
    if s.aligner:
        opts = {"ray_actor_options": {"num_cpus": s.aligner_num_cpus, "num_gpus": s.aligner_num_gpus},
                "max_ongoing_requests": max(2 * s.aligner_max_batch_size, 8)}
        if s.aligner_replicas:
            opts["num_replicas"] = s.aligner_replicas
        aligner = AlignerDeployment.options(**opts).bind(d)
    return Moderator.options(ray_actor_options={"num_cpus": s.ingress_num_cpus},
                             max_ongoing_requests=s.max_ongoing_requests,
                             max_queued_requests=s.max_queued_requests).bind(inspector, aligner, d, note)


def __getattr__(name: str):
    """``pipeline.serve:app`` is built on first access, with the defaults, so importing this
    module (as every replica does) loads nothing and checks nothing."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
