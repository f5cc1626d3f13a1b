"""LLM backends: a local transformers model (``hf:ID_OR_PATH``) or any OpenAI-compatible chat
endpoint (``openai:URL``: vLLM, TGI, hosted APIs).

Both take a list of chat conversations and return one :class:`Generation` per conversation, in
order. Per-item failures come back as ``Generation.error`` (never raised), so one bad request
costs one row, not the run. ``transient`` tells the caller whether a rerun may succeed (rate
limits, timeouts, 5xx: the item is retried on the next run) or not (HTTP 400, prompt too long).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The backend cannot be used at all (bad spec, model not loadable, endpoint unreachable)."""


@dataclass
class Generation:
    text: str | None
    finish_reason: str | None = None  # "stop" | "length" | None
    error: str | None = None
    transient: bool = False


@dataclass
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None


class Backend:
    kind = "base"
    model = ""

    def generate(self, conversations: list[list[dict]], params: GenParams) -> list[Generation]:
        raise NotImplementedError

    @property
    def chunk_size(self) -> int:
        """How many work items to hand over at once (one chunk is what a Ctrl-C can lose)."""
        return 8

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- transformers


def render_plain(messages: list[dict]) -> str:
    """Prompt for models without a chat template (base LMs): role-tagged turns, assistant last."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip())
        else:
            parts.append(f"### {m['role'].capitalize()}:\n{m['content'].strip()}")
    parts.append("### Assistant:\n")
    return "\n\n".join(parts)


class HFBackend(Backend):
    """Batched generation with a local causal or seq2seq model: loading, padding, batching and
    out-of-memory handling (halve the batch, retry) are the aligner's (``aligner.model``)."""

    kind = "hf"

    def __init__(self, model: str, batch_size: int = 8, device: str | None = None,
                 dtype: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from aligner.model import NoGenerationHead, load_checkpoint, max_positions

        self.model = model
        self.batch_size = max(1, batch_size)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"--device {self.device}: no CUDA GPU is available here; "
                               f"use --device cpu")
        try:
            self.lm, self.tokenizer = load_checkpoint(model, self.device, dtype or "auto",
                                                      what="an hf: backend model")
        except NoGenerationHead as e:
            raise BackendError(str(e)) from e
        except (OSError, ValueError) as e:
            raise BackendError(f"transformers model {model!r} (a local path or a cached hub id; the hub is "
                               f"offline here): {e}") from e
        config = self.lm.config
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        tok = self.tokenizer
        self.eos_ids = self._eos_ids(config)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(self.eos_ids[0])
        self.max_positions = max_positions(config)
        self.has_template = bool(getattr(tok, "chat_template", None))

    def _eos_ids(self, config) -> list[int]:
        ids = []
        for src in (getattr(self.lm.generation_config, "eos_token_id", None),
                    getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id,
                    self.tokenizer.sep_token_id):
            if src is None:
                continue
            ids.extend(src if isinstance(src, (list, tuple)) else [src])
        ids = list(dict.fromkeys(int(i) for i in ids))
        if not ids:
            raise BackendError(f"{self.model}: neither the model nor the tokenizer defines an "
                               "end-of-sequence token; generation could never stop")
        return ids

    @property
    def chunk_size(self) -> int:
        return self.batch_size

    def render(self, messages: list[dict]) -> str:
        """Chat template when the tokenizer has one, the plain role-tagged layout otherwise."""
        if self.has_template:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as e:  # templates that reject system turns, etc.
                log.warning("chat template failed (%s); using the plain prompt layout", e)
                self.has_template = False
        return render_plain(messages)

    def generate(self, conversations, params: GenParams) -> list[Generation]:
        import torch

        from aligner.model import generate_batched

        prompts = [self.render(m) for m in conversations]
        enc_kw = {"add_special_tokens": not self.has_template}
        ids = [list(self.tokenizer(p, **enc_kw)["input_ids"]) for p in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        ok = []
        for i, seq in enumerate(ids):
            n, limit = len(seq), self.max_positions
            if limit is not None and (n if self.seq2seq else n + params.max_new_tokens) > limit:
                out[i] = Generation(None, error=f"prompt too long: {n} tokens + {params.max_new_tokens} "
                                                f"new > the model's {limit} positions")
            else:
                ok.append(i)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sample = params.temperature > 0
        kw = dict(max_new_tokens=params.max_new_tokens, do_sample=sample,
                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids)
        if sample:
            kw.update(temperature=params.temperature, top_p=params.top_p)
        gens = generate_batched(self.lm, [ids[i] for i in ok], kw, pad_id=self.tokenizer.pad_token_id,
                                batch_size=self.batch_size)
        for i, g in zip(ok, gens):
            if g.error is not None:  # e.g. one prompt alone out of GPU memory: fail it, keep the run
                out[i] = Generation(None, error=f"generate failed: {g.error}", transient=True)
            else:
                out[i] = Generation(self.tokenizer.decode(g.tokens, skip_special_tokens=True),
                                    "stop" if g.finished else "length")
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAIBackend(Backend):
    """``POST {base_url}/chat/completions`` with bounded concurrency, retries and timeouts.

    Threads rather than asyncio: the work arrives in chunks from a synchronous loop, and a pool of
    ``concurrency`` threads over one ``httpx.Client`` is the bound (the semaphore) on requests in
    flight. Retries: 429, 5xx, timeouts and connection errors, with exponential backoff and jitter,
    honouring ``Retry-After``. The API key comes from ``OPENAI_API_KEY`` when set.
    """

    kind = "openai"

    def __init__(self, base_url: str, model: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 60.0, api_key: str | None = None):
        try:
            import httpx
        except ImportError as e:
            raise ImportError("the openai backend needs httpx; install it with "
                              "pip install 'aligner-inspector-pipeline[synth]'") from e

        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise BackendError(f"openai backend needs an http(s) base URL like "
                               f"http://127.0.0.1:8000/v1, got {base_url!r}")
        self.concurrency = max(1, concurrency)
        self.max_retries = max(0, max_retries)
        self.backoff, self.max_backoff = backoff, max_backoff
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=self.concurrency,
                                max_keepalive_connections=self.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="synth-http")
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.model = model or self._default_model()

    def _default_model(self) -> str:
        """vLLM/TGI serve one model: take the first id from ``GET /models`` when none is given."""
        try:
            r = self.client.get(f"{self.base_url}/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except Exception as e:
            raise BackendError(f"no --model given and {self.base_url}/models did not name one "
                               f"({type(e).__name__}: {e}); pass --model") from e

    @property
    def chunk_size(self) -> int:
        return self.concurrency * 2

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        with self._lock:
            jitter = 1 + self._rng.random() * 0.25
        time.sleep(min(self.max_backoff, delay) * jitter)

    def _one(self, messages: list[dict], params: GenParams) -> Generation:
        import httpx

        payload = {"model": self.model, "messages": messages, "max_tokens": params.max_new_tokens,
                   "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            payload["seed"] = params.seed
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                r = self.client.post(f"{self.base_url}/chat/completions", json=payload)
            except httpx.TimeoutException as e:
                last = f"timeout ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {e})"
            else:
                if r.status_code == 200:
                    return self._parse_response(r)
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code != 429 and r.status_code < 500:
                    return Generation(None, error=last, transient=False)
                retry_after = r.headers.get("retry-after")
            if attempt < self.max_retries:
                log.debug("retrying after %s (attempt %d)", last, attempt + 1)
                self._sleep(attempt, retry_after)
        return Generation(None, error=f"gave up after {self.max_retries + 1} attempts: {last}",
                          transient=True)

    @staticmethod
    def _parse_response(r) -> Generation:
        try:
            choice = r.json()["choices"][0]
            content = choice["message"].get("content")
            finish = choice.get("finish_reason")
        except Exception as e:
            return Generation(None, error=f"unexpected response body ({type(e).__name__}): {r.text[:200]}",
                              transient=False)
        if content is not None and not isinstance(content, str):
            return Generation(None, error=f"message content is {type(content).__name__}, not text")
        return Generation(content or "", finish)

    def generate(self, conversations, params: GenParams) -> list[Generation]:
        return list(self.pool.map(lambda m: self._one(m, params), conversations))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def make_backend(spec: str, *, model: str | None = None, batch_size: int = 8,
                 concurrency: int = 8, timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 1.0, device: str | None = None) -> Backend:
    """``hf:ID_OR_PATH`` or ``openai:URL`` -> a ready backend."""
    kind, _, target = spec.partition(":")
    if kind == "hf" and target:
        return HFBackend(target, batch_size=batch_size, device=device)
    if kind == "openai" and target:
        return OpenAIBackend(target, model=model, concurrency=concurrency, timeout=timeout,
                             max_retries=max_retries, backoff=backoff)
    raise BackendError(f"backend must be 'hf:MODEL_ID_OR_PATH' or 'openai:BASE_URL', got {spec!r}")
