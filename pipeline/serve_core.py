"""The plain-Python parts of the Ray Serve deployment (``pipeline.serve``), testable without Ray.

- ``ServeSettings``: the application's configuration (``serve run`` arguments or the ``args:`` of
  ``serve_config.yaml``), validated with clear messages and resolved to absolute paths.
- ``InspectorService`` / ``AlignerService``: what the Inspector and Aligner deployments run on a
  batch; neither raises for one bad pair.
- ``ModerationFlow``: the ingress's decision for one request: ``pipeline.core.moderate``, the code
  the batch job runs, with the inspector and aligner behind async callables (Serve handles in
  production), plus the metrics.
- Request parsing for ``/v1/moderate`` and ``/v1/chat/completions`` and the metrics layer.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter as _Tally
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aligner.results import CorrectionResult, Reason

from .tables import extract_pair
from .core import Calls, InspectorScorer, PairScore, moderate
from .routing import DEFAULT_REFUSAL, Moderation, PipelineConfig


# ----------------------------------------------------------------------------- configuration
SHED_HEADROOM = 0.5          # admit scoring work for half the budget: the rest covers queueing and spikes
TYPICAL_REQUEST_TOKENS = 128  # a one-pair chat request (query + answer of ~400 characters), for queue sizing


class ServeSettings(BaseModel):
    """Application settings. Deployment-level knobs that Serve itself owns (autoscaling,
    replicas) can also be set in the ``deployments:`` section of a Serve config, which wins."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite timeout is a hang

    # models and the decision
    inspector: str | None = Field(None, description="inspector folder; None: $INSPECTOR_MODEL, else the bundled one")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="None: the inspector's stored threshold")
    aligner: str | None = Field("auto", description="'auto' (models/aligner-small if present), 'none', an id or a path")
    fallback: Literal["fail_open", "fail_closed"] = "fail_open"
    refusal_text: str = DEFAULT_REFUSAL
    reinspect: bool = True
    max_new_tokens: int | None = Field(None, ge=1)
    generation: dict[str, Any] = Field(default_factory=dict, description="extra generate() kwargs")
    aligner_device: str = "auto"
    download_models: bool = Field(False, description="let replicas download a Hugging Face hub id that is "
                                  "not in the local cache (needs the network on every node); false: the "
                                  "build fails at once with a clear error instead of pending")
    torch_threads: int | None = Field(None, ge=1)
    inspector_int8: bool = Field(False, description="int8-quantised inspector encoder: ~1.4x faster on CPU, "
                                                    "scores move a little (README, 'int8')")
    # resources and batching
    aligner_num_gpus: float = Field(0.0, ge=0)
    aligner_num_cpus: float = Field(0.5, ge=0)
    inspector_num_cpus: float = Field(1.0, ge=0)
    ingress_num_cpus: float = Field(0.25, ge=0)
    inspector_replicas: int | None = Field(None, ge=1)
    ingress_replicas: int = Field(1, ge=1, description="Moderator replicas; each admits its share of the "
                                  "inspector capacity")
    aligner_replicas: int | None = Field(None, ge=1)
    inspector_max_batch_size: int = Field(32, ge=1)
    inspector_batch_wait_s: float = Field(0.005, ge=0)
    aligner_max_batch_size: int = Field(8, ge=1)
    aligner_batch_wait_s: float = Field(0.02, ge=0)
    # backpressure, work budgets and timeouts (README "Serving behind a chatbot", /work/serving_notes.md)
    max_ongoing_requests: int | None = Field(None, ge=1, description="ingress: requests one replica works on "
                                             "at once; None: derived from the inspector's drain capacity")
    max_queued_requests: int | None = Field(None, ge=-1, description="ingress: queued beyond that answer 503; "
                                            "-1 = no limit; None: derived (see ingress_limits)")
    inspector_timeout_s: float = Field(10.0, gt=0, description="the scoring step's budget per request")
    aligner_timeout_s: float = Field(30.0, gt=0)
    request_timeout_s: float | None = Field(None, gt=0, description="the ingress's own end-to-end limit per "
                                            "request (504 past it); None: derived from the step timeouts")
    inspector_tokens_per_s: float = Field(6000.0, gt=0, description="estimated tokens (pair_cost) one "
                                          "Inspector replica scores per second; sizes the queues")
    inspector_batch_tokens: int = Field(4096, ge=64, description="estimated tokens per inspector batch: "
                                        "the most one scoring thread call works on")
    max_request_tokens: int | None = Field(None, ge=1, description="estimated tokens per request (more "
                                           "answers 413); None: the inspector capacity")
    # the chat proxy
    upstream_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://host:8080/v1")
    upstream_timeout_s: float = Field(60.0, gt=0)
    upstream_api_key_env: str | None = Field(None, description="env var holding the upstream API key")
    expose_original: bool = Field(False, description="chat proxy: add each choice's upstream text as "
                                  "moderation.choices[].original_content, even when it was replaced "
                                  "(corrected or refused); only for trusted callers")
    # streamed answers ("stream": true; pipeline.streaming, docs/serving.md "Streamed answers")
    stream_check_chars: int = Field(100, ge=1, description="stream: held text is checked up to its last "
                                    "sentence end at or past this many characters (without "
                                    "stream_sentence_boundaries: once this many are held)")
    stream_sentence_boundaries: bool = Field(True, description="stream: wait for a sentence end (. ! ? or a "
                                             "line break) before checking, up to stream_max_holdback_chars")
    stream_max_holdback_chars: int = Field(400, ge=1, description="stream: the most text held back: a check "
                                           "runs once this many characters are held, sentence end or not")
    # request limits
    max_items: int = Field(256, ge=1)
    max_chars: int = Field(20000, ge=1)

    @field_validator("aligner", "inspector", "threshold", "upstream_url", "upstream_api_key_env",
                     "max_new_tokens", mode="before")
    @classmethod
    def _none_words(cls, v):
        """``serve run ... aligner=none`` passes the string 'none'."""
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null"):
            return None
        return v

    @field_validator("generation", mode="before")
    @classmethod
    def _json_dict(cls, v):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"generation must be a JSON object of generate() arguments: {exc}") from None
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.upstream_url is not None and not self.upstream_url.startswith(("http://", "https://")):
            raise ValueError(f"upstream_url must start with http:// or https://, got {self.upstream_url!r}")
        if self.stream_max_holdback_chars < self.stream_check_chars:
            raise ValueError(f"stream_max_holdback_chars ({self.stream_max_holdback_chars}) must be at least "
                             f"stream_check_chars ({self.stream_check_chars})")
        if self.request_timeout_s is not None and self.request_timeout_s <= self.inspector_timeout_s:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s}) must exceed inspector_timeout_s "
                             f"({self.inspector_timeout_s}): every request is scored first")
        self.pipeline_config()  # the decision's own checks (threshold, fallback, refusal_text)
        return self

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(threshold=self.threshold, fallback=self.fallback, refusal_text=self.refusal_text,
                              reinspect=self.reinspect, max_new_tokens=self.max_new_tokens,
                              generation=dict(self.generation))

    # -- limits derived from the settings (how: /work/serving_notes.md, "Sizing the queues") ----------
    def inspector_capacity_tokens(self) -> int:
        """Estimated tokens the inspector replicas drain within ``SHED_HEADROOM`` of
        ``inspector_timeout_s``, this ingress replica's share: the most scoring work it keeps
        admitted at once. Work beyond it would wait longer than a request's budget, so it is refused
        at once (503). Replicas: ``inspector_replicas``, else 1 (with autoscaling: its floor)."""
        replicas = self.inspector_replicas or 1
        total = self.inspector_tokens_per_s * replicas * self.inspector_timeout_s * SHED_HEADROOM
        return max(int(total / self.ingress_replicas), self.inspector_batch_tokens)

    def request_token_budget(self) -> int:
        return self.max_request_tokens or self.inspector_capacity_tokens()

    def ingress_limits(self) -> tuple[int, int]:
        """``(max_ongoing_requests, max_queued_requests)`` of one ingress replica: together no more
        requests of ``TYPICAL_REQUEST_TOKENS`` than the inspector drains within the budget, so a
        request let into the queue can still be answered in time; explicit settings win."""
        fits = max(1, self.inspector_capacity_tokens() // TYPICAL_REQUEST_TOKENS)
        ongoing = self.max_ongoing_requests or min(64, fits)
        queued = self.max_queued_requests if self.max_queued_requests is not None else max(1, fits - ongoing)
        return ongoing, queued

    def effective_request_timeout_s(self) -> float:
        """``request_timeout_s``, else scoring + re-inspection + aligner (+ upstream) + 5 s."""
        if self.request_timeout_s is not None:
            return self.request_timeout_s
        t = 2 * self.inspector_timeout_s + 5.0
        if self.aligner is not None:
            t += self.aligner_timeout_s
        if self.upstream_url is not None:
            t += self.upstream_timeout_s
        return t

    def generation_kwargs(self) -> dict:
        return self.pipeline_config().generation_kwargs()


def _looks_like_path(s: str) -> bool:
    """A local folder (existing or meant to be) rather than a hub id like ``org/name``."""
    from aligner import DEFAULT_ALIGNER_DIR

    p = Path(s).expanduser()
    return (p.exists() or s.startswith((".", "/", "~")) or len(p.parts) > 2
            or p == DEFAULT_ALIGNER_DIR)


def resolve_settings(settings: ServeSettings | dict | None) -> tuple[ServeSettings, str | None]:
    """Absolute model paths (replicas may run in another directory) and an early, clear error for
    a missing model. Returns the settings and, when no aligner will run, why (for /healthz)."""
    from aligner import HOW_TO_GET_DEFAULT, find_default_aligner
    from inspector import DEFAULT_MODEL_DIR

    s = ServeSettings.model_validate(settings or {}) if not isinstance(settings, ServeSettings) else settings
    updates: dict[str, Any] = {}
    insp = s.inspector or os.environ.get("INSPECTOR_MODEL")
    if insp:
        folder = Path(insp).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ValueError(f"inspector={insp!r}: no config.json there; expected a folder written by "
                             f"`python -m inspector.train` or Inspector.save")
        updates["inspector"] = str(folder)
    elif not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ValueError(f"the bundled inspector is missing ({DEFAULT_MODEL_DIR}): run `make inspector` "
                         f"or set inspector=PATH")
    if s.generation:
        from aligner.model import check_generation_keys

        try:  # a typo fails `serve run` here, once, in the driver (not in every replica, not per request)
            check_generation_keys(s.generation)
        except ValueError as e:
            raise ValueError(f"generation: {e}") from None
    note = None
    if s.aligner == "auto":
        found = find_default_aligner()
        updates["aligner"] = str(found.resolve()) if found else None
        note = None if found else HOW_TO_GET_DEFAULT
    elif s.aligner is None:
        note = "aligner disabled in the config (aligner=none)"
    elif _looks_like_path(s.aligner):
        path = Path(s.aligner).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"aligner={s.aligner!r}: no model found there (no config.json); "
                             f"{HOW_TO_GET_DEFAULT}")
        updates["aligner"] = str(path)
    elif not s.download_models and not _hub_cached(s.aligner):
        raise ValueError(_not_cached("aligner", s.aligner))
    if not s.download_models:
        _check_embedder(Path(updates.get("inspector") or DEFAULT_MODEL_DIR))
    return s.model_copy(update=updates), note


def _hub_cached(repo_id: str) -> bool:
    """Whether a Hugging Face hub id has its config.json in the local cache (HF_HOME): replicas
    load it without the network. An id the hub would refuse (bad characters) is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings it
        return True
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - HFValidationError and the like: not a usable id
        return False
    return isinstance(found, str)


def _not_cached(what: str, repo_id: str) -> str:
    from huggingface_hub import constants

    return (f"{what}={repo_id!r} is a Hugging Face hub id that is not in the local cache "
            f"({constants.HF_HUB_CACHE}): replicas would try to download it and, without the network, "
            f"fail and restart forever. Download it first (`huggingface-cli download {repo_id}`, on "
            f"every node), give a local folder, or set download_models=true")


def _check_embedder(folder: Path) -> None:
    """The inspector's embedder (config.json ``embedder``): packaged, a local folder or a cached id."""
    from inspector.encoder import DEFAULT_EMBEDDER

    try:
        embedder = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("embedder")
    except (OSError, ValueError, AttributeError):
        return  # Inspector.load reports an unreadable folder in its own words
    if not isinstance(embedder, str) or embedder in ("", DEFAULT_EMBEDDER) or embedder.startswith("packaged:"):
        return
    if Path(embedder).expanduser().exists():
        return
    if embedder.startswith((".", "/", "~")) or not _hub_cached(embedder):
        raise ValueError(_not_cached(f"the inspector's embedder (in {folder / 'config.json'})", embedder)
                         if not embedder.startswith((".", "/", "~")) else
                         f"the inspector's embedder {embedder!r} (in {folder / 'config.json'}) is missing")


# ----------------------------------------------------------------------------- services
class InspectorService:
    """The inspector as its deployment runs it: validates each pair, scores the valid ones in one
    call, and answers every pair (an invalid one gets an error, never fails the others)."""

    def __init__(self, path: str | None = None, torch_threads: int | None = None, int8: bool = False):
        from inspector import Inspector

        _set_threads(torch_threads)
        self.path = path
        self.inspector = Inspector.load(path, int8=int8)

    @property
    def threshold(self) -> float:
        return float(self.inspector.threshold)

    def info(self) -> dict:
        cfg = self.inspector.config
        return {"threshold": self.threshold, "path": self.path or "bundled default",
                "embedder": cfg.get("embedder"), "members": self.inspector.encoder.members,
                "int8": self.inspector.encoder.int8}

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[PairScore]:
        """One ``PairScore`` per pair; a pair that fails (invalid, or the model raises on it) fails
        alone (``pipeline.core.InspectorScorer``, what the batch job scores with)."""
        return InspectorScorer(self.inspector).score_pairs([p[0] for p in pairs], [p[1] for p in pairs])


class AlignerService:
    """The aligner as its deployment runs it: one ``correct_detailed`` call per batch, with the
    configured generation settings and deadline; never raises (a failure is a failed result)."""

    def __init__(self, id_or_path: str, device: str = "auto", generation: dict | None = None,
                 timeout_s: float | None = None, batch_size: int = 8, torch_threads: int | None = None):
        from aligner import Aligner

        _set_threads(torch_threads)
        self.id_or_path = id_or_path
        self.aligner = Aligner.load(id_or_path, device=device)
        self.generation = dict(generation or {})
        self.aligner.check_generation(self.generation)  # bad values fail the replica's start, not requests
        self.timeout_s = timeout_s
        self.batch_size = batch_size

    def info(self) -> dict:
        return {"model": self.id_or_path, "device": str(self.aligner.device),
                "max_new_tokens": self.generation.get("max_new_tokens", self.aligner.max_new_tokens)}

    def correct_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[CorrectionResult]:
        if not pairs:
            return []
        try:
            return self.aligner.correct_detailed([p[0] for p in pairs], [p[1] for p in pairs],
                                                 batch_size=self.batch_size, timeout_s=self.timeout_s,
                                                 **self.generation)
        except Exception as exc:  # noqa: BLE001 - the rows get the fallback, the replica stays up
            msg = f"aligner error: {type(exc).__name__}: {exc}"[:500]
            return [CorrectionResult.failed(Reason.ALIGNER_ERROR, msg) for _ in pairs]


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- work budgets, admission, health
DEFAULT_RECIPE = {"max_length": 256, "max_query_tokens": 64, "stride": 32, "max_chunks": 16}
CHARS_PER_TOKEN = 3  # English word pieces average ~4.5 characters: 3 errs on the side of cost


def estimate_tokens(text: str) -> int:
    """Word pieces a text costs, from its characters alone (no tokenizer in the ingress): one per
    ``CHARS_PER_TOKEN`` ASCII characters, one per other character (CJK, symbols, look-alikes)."""
    if text.isascii():
        return -(-len(text) // CHARS_PER_TOKEN)
    n_ascii = len(text.encode("ascii", "ignore"))
    return -(-n_ascii // CHARS_PER_TOKEN) + (len(text) - n_ascii)


def pair_cost(query: str, answer: str, recipe: dict | None = None) -> int:
    """Estimated encoder tokens the inspector spends on a pair: the query (cut to
    ``max_query_tokens``) with the answer in one window, or up to ``max_chunks`` full windows
    (``inspector.encoder``: long answers are split into overlapping windows, at most max_chunks)."""
    r = {**DEFAULT_RECIPE, **(recipe or {})}
    q = min(estimate_tokens(query), r["max_query_tokens"])
    a = estimate_tokens(answer)
    room = r["max_length"] - q - 3
    if a <= room:
        return q + a + 3
    windows = min(r["max_chunks"], -(-(a - r["stride"]) // max(1, room - r["stride"])))
    return windows * r["max_length"]


def slice_pairs(pairs: Sequence[tuple[str, str]], budget: int, max_pairs: int,
                recipe: dict | None = None) -> list[tuple[list[tuple[str, str]], int]]:
    """Consecutive slices of at most ``budget`` estimated tokens and ``max_pairs`` pairs, each with
    its cost: the units of work the Inspector batches. A pair alone above the budget is a slice of
    its own, counted at the budget (its real cost is bounded by ``max_chunks`` windows)."""
    out: list[tuple[list[tuple[str, str]], int]] = []
    cur: list[tuple[str, str]] = []
    cost = 0
    for q, a in pairs:
        c = min(pair_cost(q, a, recipe), budget)
        if cur and (cost + c > budget or len(cur) >= max_pairs):
            out.append((cur, cost))
            cur, cost = [], 0
        cur.append((q, a))
        cost += c
    if cur:
        out.append((cur, cost))
    return out


class Admission:
    """The ingress's gate for scoring work, in estimated tokens (``pair_cost``).

    ``check_size`` refuses a request larger than the per-request budget (413). ``admit`` lets a
    request in only while the work already admitted plus its own fits ``capacity`` (what the
    inspector drains within the scoring budget, ``ServeSettings.inspector_capacity_tokens``);
    otherwise it is refused at once (503 with Retry-After) rather than queued to time out. A
    request larger than the capacity is admitted only when nothing else is in the works."""

    def __init__(self, capacity_tokens: int, max_request_tokens: int, drain_tokens_per_s: float):
        self.capacity, self.max_request = int(capacity_tokens), int(max_request_tokens)
        self.drain = float(drain_tokens_per_s)
        self.outstanding = 0
        self.admitted = self.refused = 0

    def check_size(self, cost: int) -> None:
        if cost > self.max_request:
            raise RequestError(413, f"this request would cost the inspector about {cost} tokens of work "
                                    f"(estimated from its characters); the limit per request is "
                                    f"{self.max_request}: send fewer or shorter pairs per request")

    def ensure_room(self, cost: int) -> None:
        """Refuse (503 with Retry-After) when ``cost`` more would not fit; hold nothing. A streamed
        request calls it before asking the upstream: overload is refused at once, as for the others."""
        if self.outstanding and self.outstanding + cost > self.capacity:
            self.refused += 1
            wait = (self.outstanding + cost - self.capacity) / self.drain
            raise StageError("admission", f"overloaded: about {self.outstanding} tokens of scoring work are "
                                          f"already in the works (capacity {self.capacity}); retry later",
                             status=503, retry_after_s=max(1, math.ceil(wait)))

    def admit(self, cost: int, force: bool = False) -> "_Ticket":
        """Hold ``cost`` while the work runs. ``force``: counted but never refused (a check of a
        stream already admitted: shedding it would cut an answer half-way)."""
        if not force:
            self.ensure_room(cost)
        self.outstanding += cost
        self.admitted += 1
        return _Ticket(self, cost)

    def state(self) -> dict:
        return {"outstanding_tokens": self.outstanding, "capacity_tokens": self.capacity,
                "max_request_tokens": self.max_request, "admitted": self.admitted, "refused": self.refused}


class _Ticket:
    def __init__(self, gate: Admission, cost: int):
        self.gate, self.cost = gate, cost

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.gate.outstanding -= self.cost
        self.cost = 0
        return False


class RecentOutcomes:
    """The inspector's recent calls (the last ``window_s``), for ``/healthz``: ``verdict`` is
    why the inspector is not answering (None when it is): at least ``min_calls`` calls of which
    ``max_failure_share`` or more failed (timed out, unavailable)."""

    def __init__(self, window_s: float = 30.0, min_calls: int = 5, max_failure_share: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s, self.min_calls, self.max_share, self.clock = window_s, min_calls, max_failure_share, clock
        self._events: list[tuple[float, bool, str | None]] = []

    def record(self, ok: bool, detail: str | None = None) -> None:
        self._events.append((self.clock(), ok, detail))
        self._trim()

    def _trim(self) -> None:
        cut = self.clock() - self.window_s
        k = 0
        while k < len(self._events) and self._events[k][0] < cut:
            k += 1
        if k:
            del self._events[:k]
        if len(self._events) > 10000:
            del self._events[:-10000]

    def summary(self) -> dict:
        self._trim()
        failed = [e for e in self._events if not e[1]]
        return {"window_s": self.window_s, "calls": len(self._events), "failures": len(failed),
                "last_failure": failed[-1][2] if failed else None}

    def verdict(self) -> str | None:
        s = self.summary()
        if s["calls"] >= self.min_calls and s["failures"] >= self.max_share * s["calls"]:
            return (f"the inspector failed {s['failures']} of its last {s['calls']} calls "
                    f"(in {self.window_s:g} s); last: {s['last_failure']}")
        return None


# ----------------------------------------------------------------------------- request parsing
class RequestError(Exception):
    """A whole request is unusable: HTTP ``status`` with ``detail``."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


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
            raise RequestError(413, f"{len(body)} items in one request; the limit is {max_items}")
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


# ----------------------------------------------------------------------------- metrics
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
HOLDBACK_BOUNDARIES_CHARS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


class PipelineMetrics:
    """What the ingress counts. Totals are kept in-process (``totals``) and, with ``export``,
    recorded as Ray Serve metrics, which Ray publishes for Prometheus as ``ray_moderation_*``
    (the deployment, replica and application tags are added by Serve).

    ``moderation_flagged_total / moderation_pairs_total`` is the share of answers that paid the
    aligner's cost: the alignment tax actually paid. ``moderation_flagged_share`` is that ratio
    since the replica started."""

    def __init__(self, export: bool = True):
        self.totals: _Tally = _Tally()
        self._m: dict[str, Any] = {}
        if export:
            from ray.serve.metrics import Counter, Gauge, Histogram

            c = lambda name, desc, tags: Counter(name, description=desc, tag_keys=tags)  # noqa: E731
            h = lambda name, desc, tags: Histogram(  # noqa: E731
                name, description=desc, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)
            self._m = {
                "requests": c("moderation_requests_total", "HTTP requests by endpoint and status code",
                              ("endpoint", "status")),
                "pairs": c("moderation_pairs_total", "(query, answer) pairs scored", ("endpoint",)),
                "flagged": c("moderation_flagged_total", "pairs the inspector routed to the aligner",
                             ("endpoint",)),
                "corrected": c("moderation_corrected_total", "pairs answered with the aligner's correction",
                               ("endpoint",)),
                "fallbacks": c("moderation_fallbacks_total", "flagged pairs answered by the fallback policy",
                               ("endpoint", "policy", "reason")),
                "errors": c("moderation_errors_total", "failures by stage", ("stage",)),
                "share": Gauge("moderation_flagged_share", description="flagged / scored pairs since start",
                               tag_keys=("endpoint",)),
                "request_ms": h("moderation_request_latency_ms", "ingress latency per request", ("endpoint",)),
                "inspector_ms": h("moderation_inspector_latency_ms", "inspector step latency per request", ()),
                "aligner_ms": h("moderation_aligner_latency_ms", "aligner step latency per request with "
                                "flagged pairs", ()),
                "upstream_ms": h("moderation_upstream_latency_ms", "upstream chatbot latency", ()),
                "stream_ttft_ms": h("moderation_stream_ttft_ms", "streamed requests: request start to the "
                                    "first released text", ()),
                "stream_holdback_ms": h("moderation_stream_holdback_ms", "streamed requests: the longest "
                                        "any text waited for its check, per request", ()),
                "stream_holdback_chars": Histogram("moderation_stream_holdback_chars", description=(
                    "streamed requests: the most unreleased text one check covered, per request"),
                    boundaries=HOLDBACK_BOUNDARIES_CHARS, tag_keys=()),
                "stream_checks": c("moderation_stream_checks_total", "inspector checks of streamed answers", ()),
                "stream_flags": c("moderation_stream_flags_total", "streamed answers cut by a flag: during "
                                  "the upstream's stream or at its end", ("when",)),
            }

    def _inc(self, key: str, n: float = 1, **tags) -> None:
        self.totals[(key, *sorted(tags.items()))] += n
        self.totals[key] += n
        if key in self._m and n:
            self._m[key].inc(n, tags={k: str(v) for k, v in tags.items()} or None)

    def _observe(self, key: str, value: float, **tags) -> None:
        if key in self._m:
            self._m[key].observe(value, tags={k: str(v) for k, v in tags.items()} or None)

    def request(self, endpoint: str, status: int, latency_ms: float) -> None:
        self._inc("requests", endpoint=endpoint, status=status)
        self._observe("request_ms", latency_ms, endpoint=endpoint)

    def outcomes(self, endpoint: str, results: Sequence[Moderation], policy: str) -> None:
        flagged = sum(r.flagged for r in results if r.error is None)
        self._inc("pairs", sum(r.error is None for r in results), endpoint=endpoint)
        self._inc("flagged", flagged, endpoint=endpoint)
        self._inc("corrected", sum(r.corrected for r in results), endpoint=endpoint)
        results = [r for r in results if r.error is None]
        for r in results:
            if r.fallback:
                reason = (r.reason or Reason.UNUSABLE).value
                self._inc("fallbacks", 1, endpoint=endpoint, policy=r.fallback, reason=reason)
        pairs = self.totals[("pairs", ("endpoint", endpoint))]
        if pairs and "share" in self._m:
            self._m["share"].set(self.totals[("flagged", ("endpoint", endpoint))] / pairs,
                                 tags={"endpoint": endpoint})

    def error(self, stage: str, n: int = 1) -> None:
        self._inc("errors", n, stage=stage)

    def latency(self, step: str, ms: float) -> None:
        self._observe(f"{step}_ms", ms)

    def stream(self, ttft_ms: float | None, holdback_ms: float, holdback_chars: int, checks: int) -> None:
        """One streamed request's figures, when it ends (an error event included)."""
        self._inc("stream_checks", checks)
        self._inc("streams")
        if ttft_ms is not None:
            self._observe("stream_ttft_ms", ttft_ms)
        if checks:
            self._observe("stream_holdback_ms", holdback_ms)
            self._observe("stream_holdback_chars", holdback_chars)

    def stream_flag(self, when: str) -> None:
        """A check flagged a streamed answer: ``when`` "during" the upstream's stream or at its "end"."""
        self._inc("stream_flags", when=when)


# ----------------------------------------------------------------------------- the decision
class StageError(Exception):
    """The inspector could not score a request: the ingress answers ``status`` (503)."""

    def __init__(self, stage: str, detail: str, status: int = 503, retry_after_s: int | None = None):
        super().__init__(detail)
        self.stage, self.detail, self.status, self.retry_after_s = stage, detail, status, retry_after_s


ScoreFn = Callable[[list[str], list[str]], Awaitable[Sequence["float | PairScore"]]]
CorrectFn = Callable[[list[str], list[str]], Awaitable[list[CorrectionResult]]]


class ModerationFlow:
    """One request's decision: ``pipeline.core.moderate`` (what the batch job runs) with the
    inspector and aligner behind async calls, plus the metrics. The scorer failing as a whole
    (``StageError``) is the request's failure; everything else is decided per pair."""

    def __init__(self, settings: ServeSettings, score: ScoreFn, correct: CorrectFn | None,
                 threshold: Callable[[], Awaitable[float]], metrics: PipelineMetrics | None = None):
        self.settings = settings
        self.config = settings.pipeline_config()
        self._scorer = Calls(score_fn=score)
        self._corrector = Calls(correct_fn=correct) if correct is not None else None
        self._threshold = threshold
        self.metrics = metrics or PipelineMetrics(export=False)

    async def threshold(self) -> float:
        return await self._threshold()

    async def check(self, query: str, answer: str) -> float:
        """One streaming check (``pipeline.streaming``): the inspector's score of (query, answer so
        far). ``StageError`` when it cannot score: 503 as a whole, 422 for this pair."""
        t = time.perf_counter()
        try:
            raw = list(await self._scorer.score([query], [answer]))
        except StageError:
            self.metrics.error("inspector")
            raise
        self.metrics.latency("inspector", (time.perf_counter() - t) * 1e3)
        x = raw[0] if len(raw) == 1 else PairScore(None, f"the scorer returned {len(raw)} scores for 1 pair")
        if isinstance(x, PairScore):
            if x.error is not None or x.score is None:
                self.metrics.error("score_pair")
                raise StageError("inspector", f"the answer so far could not be scored: {x.error or 'no score'}",
                                 status=422)
            x = x.score
        return float(x)

    async def moderate(self, queries: list[str], answers: list[str], endpoint: str = "moderate",
                       known_scores: Sequence[float] | None = None) -> list[Moderation]:
        """``known_scores``: the pairs were scored already (a streaming check): skip that step."""
        try:
            threshold = await self._threshold()
            out = await moderate(queries, answers, self._scorer, self._corrector, self.config, threshold,
                                 on_error=self.metrics.error, known_scores=known_scores)
        except StageError:
            self.metrics.error("inspector")
            raise
        if out:
            t = out[0].timings_ms
            if known_scores is None:
                self.metrics.latency("inspector", t["inspector_ms"])
            if self._corrector is not None and any(o.flagged for o in out):
                self.metrics.latency("aligner", t["aligner_ms"])
        bad = sum(o.error is not None for o in out)
        if bad:
            self.metrics.error("score_pair", bad)
        self.metrics.outcomes(endpoint, out, self.config.fallback)
        return out


def moderation_json(m: Moderation, index: int | None = None) -> dict:
    d = m.to_dict()
    if d.get("error") is None:  # an item's "error" key means it failed (parse_moderate_body)
        d.pop("error", None)
    if index is not None:
        d = {"index": index, **d}
    if d.get("corrected_score") is not None and not math.isfinite(d["corrected_score"]):
        d["corrected_score"] = None
    return d


def moderation_choice(m: Moderation, index: int, expose_original: bool = False) -> dict:
    """One choice's entry in a chat response's ``moderation.choices`` (the non-stream response and
    a stream's last chunk alike). The upstream text is there only with ``expose_original``."""
    d = m.to_dict()
    c = {"index": index, "score": d["score"], "flagged": d["flagged"], "corrected": d["corrected"],
         "fallback": d["fallback"], "problem": d["problem"],
         "corrected_score": d["corrected_score"], "timings_ms": d["timings_ms"]}
    if c["corrected_score"] is not None and not math.isfinite(c["corrected_score"]):
        c["corrected_score"] = None
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
