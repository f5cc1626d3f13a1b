"""The Serve application's configuration: ``ServeSettings`` (the ``serve run`` arguments or the
``args:`` of ``serve_config.yaml``), validated with clear messages, the limits derived from it
(work capacity, queue limits, timeouts), and ``resolve_settings``, which resolves model paths and
fails the build at once when a model cannot load without the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .routing import DEFAULT_REFUSAL, PipelineConfig

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
    inspector_tokens_per_s: float = Field(1500.0, gt=0, description="estimated tokens (pair_cost) one "
                                          "Inspector replica scores per second: the drain rate admission "
                                          "assumes. Measure it per machine (benchmarks/bench_drain.py); "
                                          "the default is conservative for a 1-CPU replica sharing a busy "
                                          "2-core box with the proxy and ingress (docs/serving.md)")
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
    max_items: int = Field(64, ge=1, description="pairs per /v1/moderate list (more: 413 naming the "
                           "limit); 64 typical chat pairs fit the default work budget")
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
    """The inspector's embedder (config.json ``embedder``) must load without the network: the
    packaged MiniLM (``inspector.encoder.resolve_embedder``'s rule: no name or exactly
    ``DEFAULT_EMBEDDER``; its files must be installed), a local folder, or a cached hub id."""
    from inspector.encoder import DEFAULT_EMBEDDER, resolve_embedder

    try:
        embedder = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("embedder")
    except (OSError, ValueError, AttributeError):
        return  # Inspector.load reports an unreadable folder in its own words
    if embedder is not None and not isinstance(embedder, str):
        return  # likewise a malformed config
    where = f"the inspector's embedder {embedder!r} (in {folder / 'config.json'})"
    try:
        target = resolve_embedder(embedder)
    except (ImportError, OSError) as exc:  # the packaged MiniLM is not installed
        raise ValueError(f"{where}: {exc}") from None
    if target != embedder or Path(embedder).expanduser().exists():
        return  # the packaged MiniLM (resolved to its folder), or a local folder
    if embedder.startswith((".", "/", "~")):
        raise ValueError(f"{where} is missing")
    if embedder.startswith("packaged:"):
        raise ValueError(f"{where} is not a packaged model: the one packaged embedder is {DEFAULT_EMBEDDER!r}")
    if not _hub_cached(embedder):
        raise ValueError(_not_cached(f"the inspector's embedder (in {folder / 'config.json'})", embedder))
