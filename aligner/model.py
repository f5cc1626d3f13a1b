"""The Aligner model: load any Hugging Face causal or encoder-decoder checkpoint and correct
(question, answer) pairs in length-grouped batches, never failing the whole batch for one item."""
from __future__ import annotations

import functools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .results import CorrectionResult, Reason, degenerate_reason
from .template import DEFAULT_TEMPLATE, build_prompt, validate_template

CONFIG_NAME = "aligner_config.json"
FORMAT_VERSION = 1
DEFAULT_MAX_INPUT_TOKENS = 1024
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU that supports it (half the memory, same range as fp32), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def eos_token_id(tokenizer) -> int:
    """The token that ends a correction: the tokenizer's EOS, or [SEP] for BERT-style vocabularies."""
    tok_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if tok_id is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token to end corrections with")
    return tok_id


def prepare_special_tokens(model, tokenizer) -> None:
    """Make pad / EOS / decoder-start ids agree between tokenizer, model config and generation
    config, so a checkpoint assembled from parts (e.g. bert2bert) generates and stops correctly."""
    eos = eos_token_id(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    pad = tokenizer.pad_token_id
    cfg, gen = model.config, model.generation_config
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    cfg.pad_token_id = pad
    gen.pad_token_id = pad
    current = gen.eos_token_id
    current = [current] if isinstance(current, int) else list(current or [])
    current = [i for i in current if vocab is None or i < vocab]
    if eos not in current:
        current.insert(0, eos)
    gen.eos_token_id = current[0] if len(current) == 1 else current
    if getattr(cfg, "is_encoder_decoder", False):
        start = gen.decoder_start_token_id or getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        if start is None:
            raise ValueError("cannot pick a decoder start token: set decoder_start_token_id in the config")
        cfg.decoder_start_token_id = start
        gen.decoder_start_token_id = start
        if getattr(cfg, "eos_token_id", None) is None:
            cfg.eos_token_id = eos
    if tokenizer.padding_side != "left" and not getattr(cfg, "is_encoder_decoder", False):
        tokenizer.padding_side = "left"


def encode_prompt(tokenizer, prompt: str, is_encoder_decoder: bool) -> list[int]:
    """Prompt token ids. For causal models a trailing [SEP]/EOS the tokenizer appends is dropped:
    the correction must follow the prompt directly, as in training."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not is_encoder_decoder and len(ids) > 1:
        enders = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
        if ids[-1] in enders:
            ids = ids[:-1]
    return ids


def _repeated_tail(ids: Sequence, max_n: int = 8) -> int:
    """Number of tokens covered by the longest exact repetition of an n-gram at the end."""
    best = 0
    L = len(ids)
    for n in range(1, max_n + 1):
        if 2 * n > L:
            break
        unit = list(ids[L - n:])
        reps, pos = 1, L - 2 * n
        while pos >= 0 and list(ids[pos:pos + n]) == unit:
            reps += 1
            pos -= n
        if reps >= 3:
            best = max(best, reps * n)
    return best


def detect_degenerate(text: str, token_ids: Sequence[int] = ()) -> str | None:
    """Why an output is unusable (None if it looks fine): empty, or runaway repetition (a short
    loop filling the end, or very few distinct trigrams in a long output)."""
    if not text or not text.strip():
        return "empty output"
    words = text.lower().split()
    for seq, floor in ((list(token_ids), 12), (words, 12)):
        if len(seq) >= floor:
            covered = _repeated_tail(seq)
            if covered >= max(floor, 0.4 * len(seq)):
                return "runaway repetition"
    if len(words) >= 30:
        grams = list(zip(words, words[1:], words[2:]))
        if len(set(grams)) / len(grams) < 0.35:
            return "runaway repetition"
    longest_run, run = 1, 1
    for a, b in zip(text, text[1:]):
        run = run + 1 if a == b and not a.isspace() else 1
        longest_run = max(longest_run, run)
    if longest_run >= 40:
        return "runaway repetition"
    return None


def _read_aligner_config(id_or_path: str) -> dict:
    path = Path(id_or_path)
    if path.is_dir():
        f = path / CONFIG_NAME
        f = f if f.exists() else None
    else:
        try:  # a hub id: the file may sit in the local cache (we never download here: HF_HUB_OFFLINE)
            from transformers.utils import cached_file

            f = cached_file(id_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
        except Exception:
            f = None
    if not f:
        return {}
    try:
        cfg = json.loads(Path(f).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{f}: not valid JSON ({exc}); it should be the file Aligner.save wrote") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def max_positions(config) -> int | None:
    """How many positions the model reads (None: no fixed limit, e.g. T5's relative positions);
    a bert2bert's encoder's, a multimodal model's text model's."""
    if getattr(config, "model_type", "") == "encoder-decoder":
        cfg = config.encoder
    else:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        val = getattr(cfg, name, None)
        if isinstance(val, int) and 0 < val < 10_000_000:
            return val
    return None


# generate() options that would change what generate() returns (one sequence per input, as ids)
_SHAPE_CHANGING = {"num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False,
                   "output_logits": False, "output_attentions": False, "output_hidden_states": False}
# set by the aligner itself from the tokenized prompts
_OWN_INPUTS = {"input_ids", "attention_mask", "inputs", "decoder_input_ids", "generation_config"}


@functools.lru_cache(maxsize=1)
def _known_generation_keys() -> frozenset:
    """GenerationConfig fields plus generate()'s own arguments (computed once: checked per call)."""
    import inspect

    from transformers import GenerationConfig, GenerationMixin

    known = set(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}
    known |= set(inspect.signature(GenerationMixin.generate).parameters) - {"self", "kwargs"}
    known |= {"tokenizer", "assistant_tokenizer"}  # taken through **kwargs (stop_strings needs one)
    return frozenset(known)


def check_generation_keys(generation: dict) -> None:
    """Refuse generation options ``generate()`` would ignore or choke on, before any request:
    an unknown name (a typo such as ``temprature`` would otherwise fail every batch or be silently
    ignored), inputs the aligner sets itself, and options that make it return more than one
    sequence per input."""
    import difflib

    if not isinstance(generation, dict):
        raise ValueError(f"generation must be a dict of generate() arguments, got {type(generation).__name__}")
    known = _known_generation_keys()
    for key, value in generation.items():
        if key in _OWN_INPUTS:
            raise ValueError(f"generation option {key!r} is set by the aligner from the prompt; remove it")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown generation option {key!r}{hint}; expected generate() / "
                             f"GenerationConfig arguments")
        if key in _SHAPE_CHANGING and value not in (None, _SHAPE_CHANGING[key]):
            raise ValueError(f"generation option {key}={value!r} is not supported: the aligner makes one "
                             f"correction per input (leave it at {_SHAPE_CHANGING[key]!r})")


_CONTRACTION = re.compile(r"(\w) ' (s|t|m|re|ve|ll|d)\b")
GENERATION_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "Seq2SeqLM",
                    "EncoderDecoderModel")


# ----------------------------------------------------------------------------- loading and generating
# shared by the Aligner and synth's local-model backend (``synth.backends.HFBackend``)
class NoGenerationHead(ValueError):
    """The checkpoint is an encoder (or another model) that cannot generate text."""


def load_checkpoint(id_or_path: str | os.PathLike, device: str | torch.device = "auto", dtype="auto",
                    what: str = "a model"):
    """``(model, tokenizer)`` of a causal LM or an encoder-decoder (told apart by the checkpoint's
    config), the model in eval mode on ``device``. OSError: the config cannot be read;
    NoGenerationHead: the checkpoint cannot generate (an encoder such as MiniLM). ``what`` names
    the model in those messages."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    name = str(id_or_path)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load {what} from {name!r}: {exc}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    if not config.is_encoder_decoder and archs and not any(a.endswith(GENERATION_HEADS) for a in archs):
        raise NoGenerationHead(f"{name!r} is a {archs[0]} without a text-generation head; {what} must be a "
                               f"causal LM or an encoder-decoder")
    dev = resolve_device(device)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    return model, AutoTokenizer.from_pretrained(name)


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one padded batch (ids, attention mask). Causal models need ``left``
    padding, so every row continues right after its own prompt; an encoder sees the whole input,
    so right padding is fine."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        mask[r, cols] = 1
    return ids.to(device), mask.to(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or another backend's (MPS, cuBLAS) out-of-memory RuntimeError."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class Generated:
    """One prompt's output from :func:`generate_batched`."""

    tokens: list[int] = field(default_factory=list)  # new tokens before the first EOS
    finished: bool = False  # an EOS ended it (else max_new_tokens, or the deadline, did)
    timed_out: bool = False  # the deadline had passed when its batch ended (or began: then ``error`` is set)
    error: str | None = None  # why there is no output: "out of GPU memory", "ValueError: ...", "not started"


def generate_batched(model, seqs: list[list[int]], gen: dict, *, pad_id: int,
                     batch_size: int = DEFAULT_BATCH_SIZE, deadline: float | None = None,
                     progress: str | None = None) -> list[Generated]:
    """``model.generate`` over prompts given as token ids, one :class:`Generated` per prompt in
    input order. Prompts run in batches of similar length, longest first (least padding; an
    out-of-memory shows up in the first batch). A batch that runs out of GPU memory is halved and
    retried (a single prompt that does not fit fails alone); any other error fails its batch only.
    ``gen``: generate() arguments; its ``eos_token_id`` (an id or a list) also ends ``tokens``.
    ``deadline`` (``time.monotonic()``): each batch gets what is left as ``max_time``; batches not
    started by then fail with ``timed_out``. ``progress``: a tqdm bar with that label."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    eos = gen.get("eos_token_id")
    eos_set = {eos} if isinstance(eos, int) else set(eos or [])

    def run(idx: list[int]) -> list[Generated]:
        kw = dict(gen)
        if deadline is not None:
            kw["max_time"] = max(deadline - time.monotonic(), 0.01)
        try:
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, left=not enc_dec, device=device)
            with torch.inference_mode():  # ids + mask only: T5 & co. reject token_type_ids
                out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        except Exception as exc:  # noqa: BLE001 - one failing batch must not fail the call
            if not is_out_of_memory(exc):
                return [Generated(error=f"{type(exc).__name__}: {exc}") for _ in idx]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(idx) == 1:
                return [Generated(error="out of GPU memory")]
            half = len(idx) // 2
            return run(idx[:half]) + run(idx[half:])
        timed_out = deadline is not None and time.monotonic() >= deadline
        new = out[:, 1:] if enc_dec else out[:, ids.shape[1]:]  # after the decoder start / the prompt
        results = []
        for row in new.tolist():
            stop = next((k for k, tok in enumerate(row) if tok in eos_set), None)
            results.append(Generated(row if stop is None else row[:stop], stop is not None, timed_out))
        return results

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch")
    results: list[Generated | None] = [None] * len(seqs)
    for idx in batches:
        if deadline is not None and time.monotonic() >= deadline:
            outs = [Generated(timed_out=True, error="not started") for _ in idx]
        else:
            outs = run(idx)
        for i, g in zip(idx, outs):
            results[i] = g
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the model
class Aligner:
    """A correction model plus its tokenizer, prompt template and limits."""

    def __init__(self, model, tokenizer, template: str | None = None,
                 max_input_tokens: int | None = None, max_new_tokens: int | None = None,
                 generation: dict | None = None, extra_config: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = validate_template(template or DEFAULT_TEMPLATE)
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        prepare_special_tokens(model, tokenizer)
        for name, value in (("max_new_tokens", max_new_tokens), ("max_input_tokens", max_input_tokens)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or None for the default), got {value!r}")
        self.max_new_tokens = int(DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
        limit = max_positions(model.config)
        wanted = int(DEFAULT_MAX_INPUT_TOKENS if max_input_tokens is None else max_input_tokens)
        if limit is not None:
            # a causal model's positions hold prompt and correction together
            room = limit if self.is_encoder_decoder else limit - self.max_new_tokens
            if room < 16:
                raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for the input "
                                 f"in the model's {limit} positions")
            wanted = min(wanted, room)
        self.max_input_tokens = wanted
        self.generation = dict(generation or {})
        self.extra_config = dict(extra_config or {})
        self.check_generation(self.generation)

    def check_generation(self, generation: dict) -> None:
        """Fail now, with the option named, if ``generate()`` would reject these settings: a key
        check, then one step of generation on a short prompt (milliseconds, even for a 7B on a
        GPU). Without it a bad value (``num_beams=0``, ``temperature="hot"``) fails every request
        of a deployment that started fine."""
        check_generation_keys(generation)
        gen = self._generation_kwargs(generation)
        gen["max_new_tokens"] = 1
        for k in ("min_new_tokens", "min_length", "max_length", "max_time"):
            gen.pop(k, None)
        ids, mask = self._pad([self.prompt_ids("?", "?")[0]])
        try:
            with torch.inference_mode():
                self.model.generate(input_ids=ids, attention_mask=mask, **gen)
        except Exception as exc:  # noqa: BLE001 - re-raised with the settings named
            raise ValueError(f"generation settings {generation} are rejected by the model's generate(): "
                             f"{type(exc).__name__}: {exc}"[:800]) from exc

    # -- construction -------------------------------------------------------
    @classmethod
    def load(cls, id_or_path: str | os.PathLike, device: str = "auto", dtype="auto",
             template: str | None = None, max_input_tokens: int | None = None,
             max_new_tokens: int | None = None, generation: dict | None = None) -> "Aligner":
        """Load a causal LM or an encoder-decoder (told apart by the checkpoint's config).
        Arguments left as None take the values saved in ``aligner_config.json``, then defaults."""
        name = str(id_or_path)
        try:
            model, tokenizer = load_checkpoint(name, device, dtype, what="an aligner")
        except NoGenerationHead as exc:
            raise NoGenerationHead(f"{exc}. To warm-start one from it, run "
                                   f"`python -m aligner.train --base {name} ...`") from None
        saved = _read_aligner_config(name)
        gen = dict(saved.get("generation", {}))
        gen.update(generation or {})
        if max_input_tokens is None:
            max_input_tokens = saved.get("max_input_tokens")
        if max_new_tokens is None:
            max_new_tokens = saved.get("max_new_tokens")
        return cls(model, tokenizer,
                   template=template or saved.get("template"),
                   max_input_tokens=max_input_tokens,
                   max_new_tokens=max_new_tokens,
                   generation=gen,
                   extra_config={k: v for k, v in saved.items()
                                 if k not in ("template", "max_input_tokens", "max_new_tokens", "generation")})

    def save(self, out_dir: str | os.PathLike, **extra) -> Path:
        """Write safetensors weights, tokenizer and ``aligner_config.json`` (template, limits,
        generation defaults, plus ``extra`` such as the training recipe)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        cfg = {**self.extra_config, **extra, "format_version": FORMAT_VERSION,
               "template": self.template, "max_input_tokens": self.max_input_tokens,
               "max_new_tokens": self.max_new_tokens, "generation": self.generation,
               "is_encoder_decoder": self.is_encoder_decoder}
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inference ----------------------------------------------------------
    def prompt_ids(self, query: str, answer: str) -> tuple[list[int], bool]:
        """Token ids of the prompt for one pair, and whether it had to be shortened."""
        built = build_prompt(self.tokenizer, self.template, query, answer, self.max_input_tokens)
        return encode_prompt(self.tokenizer, built.prompt, self.is_encoder_decoder), built.shortened

    def correct(self, queries: Sequence[str], answers: Sequence[str], **generation) -> list[str]:
        """Corrected answers, one per input (empty/degenerate ones included: see correct_detailed)."""
        return [r.text for r in self.correct_detailed(queries, answers, **generation)]

    def correct_detailed(self, queries: Sequence[str], answers: Sequence[str], *,
                         batch_size: int = DEFAULT_BATCH_SIZE, timeout_s: float | None = None,
                         show_progress: bool = False, **generation) -> list[CorrectionResult]:
        """Correct pairs in batches grouped by length (less padding), greedy unless told otherwise.

        Never raises for one bad item: an input that cannot be encoded, a batch whose generation
        fails, or a deadline (``timeout_s`` for the whole call) passed give ``ok=False`` results.
        """
        if isinstance(queries, str) or isinstance(answers, str):
            raise TypeError("queries and answers must be lists of strings (one pair: [query], [answer]), "
                            "not a single string")
        queries, answers = list(queries), list(answers)
        if len(queries) != len(answers):
            raise ValueError(f"got {len(queries)} queries but {len(answers)} answers")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[CorrectionResult | None] = [None] * len(queries)
        encoded: dict[int, list[int]] = {}
        notes: dict[int, list[str]] = {}
        for i, (q, a) in enumerate(zip(queries, answers)):
            if not isinstance(q, str) or not isinstance(a, str):
                results[i] = CorrectionResult.failed(Reason.INVALID_INPUT, f"query and answer must be strings, "
                                                     f"got {type(q).__name__} and {type(a).__name__}")
                continue
            try:
                ids, shortened = self.prompt_ids(q, a)
            except Exception as exc:  # noqa: BLE001 - reported per item, never raised
                results[i] = CorrectionResult.failed(Reason.INVALID_INPUT, f"input error: {exc}")
                continue
            encoded[i] = ids
            notes[i] = ["input shortened"] if shortened else []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        check_generation_keys(generation)  # a typo is the caller's error, not every item's
        todo = list(encoded)
        outputs = generate_batched(self.model, [encoded[i] for i in todo], self._generation_kwargs(generation),
                                   pad_id=self.tokenizer.pad_token_id, batch_size=batch_size, deadline=deadline,
                                   progress="aligner" if show_progress else None)
        for i, out in zip(todo, outputs):
            res = self._result(out, timeout_s)
            res.notes = notes[i] + res.notes
            if res.problem is None and res.notes:
                res.problem = "; ".join(res.notes)
            results[i] = res
        return results  # type: ignore[return-value]

    def _generation_kwargs(self, generation: dict) -> dict:
        gen = {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}
        gen.update(self.generation)
        gen.update(generation)
        gen.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen.setdefault("eos_token_id", self.model.generation_config.eos_token_id)
        if gen.get("stop_strings"):  # generate() needs the tokenizer for them; a config cannot name one
            gen.setdefault("tokenizer", self.tokenizer)
        if not gen.get("do_sample"):
            for k in ("temperature", "top_p", "top_k"):
                gen.pop(k, None)
        return gen

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(seqs, self.tokenizer.pad_token_id, left=not self.is_encoder_decoder, device=self.device)

    def _result(self, out: Generated, timeout_s: float | None) -> CorrectionResult:
        """A correction from one prompt's generated tokens (or why there is none)."""
        if out.error is not None:
            if out.timed_out:
                return CorrectionResult.failed(Reason.TIMEOUT, f"timed out after {timeout_s} s (not started)")
            return CorrectionResult.failed(Reason.ALIGNER_ERROR, f"generation error: {out.error}"[:500])
        toks = out.tokens
        text = self._clean(self.tokenizer.decode(toks, skip_special_tokens=True))
        notes = []
        if out.timed_out and not out.finished:
            # the deadline cut it short: that, not what the half-written text looks like, is why
            problem, reason = f"timed out after generating {len(toks)} tokens", Reason.TIMEOUT
        else:
            problem = detect_degenerate(text, toks)
            reason = degenerate_reason(problem)
            if problem is None and not out.finished:
                notes.append("stopped at max_new_tokens")
        return CorrectionResult(text, problem is None, problem, len(toks) + int(out.finished), notes, reason)

    def _clean(self, text: str) -> str:
        """Undo WordPiece spacing an uncased BERT vocabulary leaves ("i ' m" -> "I'm") and
        capitalise sentence starts; other tokenizers' text is only stripped."""
        text = text.strip()
        if not getattr(self.tokenizer, "do_lower_case", False):
            return text
        text = _CONTRACTION.sub(r"\1'\2", text)
        text = re.sub(r"\s+([.,!?;:])", r"\1", text)
        text = re.sub(r"\bi\b", "I", text)
        return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)

    def __repr__(self) -> str:
        kind = "encoder-decoder" if self.is_encoder_decoder else "causal"
        return (f"Aligner({type(self.model).__name__}, {kind}, device={self.device}, "
                f"max_input_tokens={self.max_input_tokens}, max_new_tokens={self.max_new_tokens})")
