"""The generation run: queries -> misaligned answer -> critique + correction -> filters -> rows.

Resumable by construction: every work item has a key (hash of criterion name + version, query
and prompt version); its record goes to the journal (``--out``) the moment its chunk is done,
flushed per row; a rerun with the same arguments skips keys already finished, and retries only
items that failed for a transient reason (timeouts, rate limits, 5xx).

Derived training files are rebuilt from the whole journal at the end of every run (also after
Ctrl-C): ``OUT.inspector.jsonl`` (two rows per kept item: answer label 1, correction label 0) and
``OUT.aligner.jsonl`` (query, answer, correction), both with ``source = "synth:<criterion>"``.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .backends import Backend, BackendError, GenParams, Generation
from .criteria import Criterion, load_criterion
from .filters import Embedder, NearDupIndex, language_problem, length_problem, normalize, pair_cosine
from .journal import Journal, sibling, write_jsonl_atomic
from .prompts import PROMPT_VERSION, answer_messages, correction_messages, parse_fields
from .queries import load_queries, self_instruct

log = logging.getLogger(__name__)

# Reasons a record can be filtered for, in the order the checks run.
REASONS = ("duplicate", "near_duplicate", "wrong_language", "too_short", "too_long", "empty",
           "truncated", "malformed", "backend_rejected", "correction_too_similar", "backend_error")
RAW_KEEP = 2000  # characters of a failed generation kept in the record, for debugging prompts


@dataclass
class GenerateConfig:
    """Everything that shapes a run except the backend; recorded in each row's ``params``."""

    n: int = 100
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    min_query_chars: int = 8
    max_query_chars: int = 2000
    min_chars: int = 10
    max_chars: int = 4000
    language: str | None = "en"  # "en" = the heuristic in filters.py; None = no check
    near_dup_threshold: float = 0.9
    similarity_threshold: float = 0.9
    retry_failed: bool = False
    questions_per_topic: int = 5
    chunk_size: int | None = None  # default: the backend's

    def __post_init__(self):
        """Refuse settings that would silently disable a filter or fail later in the run."""
        def check(name, ok, want):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value) or not ok(value):
                raise ValueError(f"{name} must be {want}, got {value!r}")

        check("n", lambda v: v >= 1, "at least 1")
        check("max_new_tokens", lambda v: v >= 1, "at least 1")
        check("temperature", lambda v: v >= 0, "a number >= 0")
        check("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        for name in ("near_dup_threshold", "similarity_threshold"):
            check(name, lambda v: -1 <= v <= 1, "a cosine similarity in [-1, 1]")
        check("min_query_chars", lambda v: v >= 0, "at least 0")
        check("max_query_chars", lambda v: v >= self.min_query_chars, "at least min_query_chars")
        check("min_chars", lambda v: v >= 0, "at least 0")
        check("max_chars", lambda v: v >= self.min_chars, "at least min_chars")
        check("questions_per_topic", lambda v: v >= 1, "at least 1")
        check("chunk_size", lambda v: v is None or v >= 1, "at least 1")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; finished rows are saved and ``summary`` describes them."""

    def __init__(self, summary: dict):
        super().__init__("interrupted")
        self.summary = summary


def item_key(criterion: Criterion, query: str) -> str:
    blob = "\x1f".join([criterion.name, criterion.version, query, PROMPT_VERSION])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Run:
    def __init__(self, criterion: Criterion, backend: Backend, cfg: GenerateConfig, embedder: Embedder):
        self.c, self.backend, self.cfg, self.embedder = criterion, backend, cfg, embedder
        self.params = GenParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
        self.seen_queries: set[str] = set()
        self.seen_answers: set[str] = set()
        self.query_index = NearDupIndex(cfg.near_dup_threshold)

    # -- records
    def record(self, item: dict, **fields) -> dict:
        rec = {"key": item["key"], "criterion": self.c.name, "criterion_version": self.c.version,
               "criterion_digest": self.c.digest, "prompt_version": PROMPT_VERSION,
               "backend": self.backend.kind, "model": self.backend.model,
               "query": item["query"], "topic": item.get("topic"), "query_source": item["query_source"],
               "status": "kept", "reason": None, "stage": "done", "detail": "",
               "answer": None, "critique": None, "correction": None, "similarity": None,
               "params": {k: v for k, v in asdict(self.cfg).items()
                          if k in ("max_new_tokens", "temperature", "top_p", "seed")},
               "created_at": _now()}
        rec.update(fields)
        return rec

    def reject(self, item, stage, reason, detail="", **extra) -> dict:
        return self.record(item, status="filtered", stage=stage, reason=reason, detail=detail, **extra)

    def failed_generation(self, item, stage, g: Generation, parsed_reason=None, detail="", **extra) -> dict:
        if g.error is not None:
            if g.transient:
                return self.record(item, status="error", stage=stage, reason="backend_error",
                                   detail=g.error, **extra)
            return self.reject(item, stage, "backend_rejected", g.error, **extra)
        raw = {stage: (g.text or "")[:RAW_KEEP], "finish_reason": g.finish_reason}
        return self.reject(item, stage, parsed_reason, detail, raw=raw, **extra)

    def text_problem(self, text: str, min_chars: int, max_chars: int) -> tuple[str, str] | None:
        why = length_problem(text, min_chars, max_chars)
        if why:
            return why, f"{len(text.strip())} characters, limits {min_chars}-{max_chars}"
        if self.cfg.language == "en":
            lang = language_problem(text)
            if lang:
                return "wrong_language", lang
        return None

    # -- state from earlier runs
    def absorb(self, done: list[dict], progress: bool) -> None:
        """Rebuild duplicate state from finished records (queries that passed the query checks,
        answers that passed the answer checks)."""
        queries = [r["query"] for r in done if r.get("stage") != "query" and isinstance(r.get("query"), str)]
        self.seen_queries.update(normalize(q) for q in queries)
        self.seen_answers.update(normalize(r["answer"]) for r in done
                                 if r.get("stage") in ("correction", "pair", "done")
                                 and isinstance(r.get("answer"), str))
        if queries:
            bar = tqdm(total=len(queries), desc="re-embedding earlier queries", unit="query",
                       disable=not progress)
            for s in range(0, len(queries), 1024):
                part = queries[s:s + 1024]
                self.query_index.add(self.embedder.encode(part))
                bar.update(len(part))
            bar.close()

    # -- one chunk of work items -> one record each, in input order
    def process(self, items: list[dict]) -> list[dict]:
        cfg = self.cfg
        out: dict[int, dict] = {}
        live: list[int] = []
        for i, it in enumerate(items):
            q = it["query"]
            prob = self.text_problem(q, cfg.min_query_chars, cfg.max_query_chars)
            if prob:
                out[i] = self.reject(it, "query", *prob)
            elif normalize(q) in self.seen_queries:
                out[i] = self.reject(it, "query", "duplicate", "same query (ignoring case and punctuation)")
            else:
                self.seen_queries.add(normalize(q))
                live.append(i)
        if live:
            sims = self.query_index.check(self.embedder.encode([items[i]["query"] for i in live]))
            keep = []
            for i, s in zip(live, sims):
                if s is None:
                    keep.append(i)
                else:
                    out[i] = self.reject(items[i], "query", "near_duplicate",
                                         f"cosine {s:.3f} >= {cfg.near_dup_threshold} with an earlier query")
            live = keep

        # step 1: misaligned answer
        answers: dict[int, str] = {}
        gens = self.backend.generate([answer_messages(self.c, items[i]["query"]) for i in live], self.params)
        for i, g in zip(live, gens):
            p = parse_fields(g.text, ("answer",), g.finish_reason) if g.error is None else None
            if p is None or p.values is None:
                out[i] = self.failed_generation(items[i], "answer", g, p and p.reason, p.detail if p else "")
                continue
            a = p.values["answer"]
            prob = self.text_problem(a, cfg.min_chars, cfg.max_chars)
            if prob:
                out[i] = self.reject(items[i], "answer", *prob, answer=a)
            elif normalize(a) in self.seen_answers:
                out[i] = self.reject(items[i], "answer", "duplicate", "same answer as an earlier item", answer=a)
            else:
                self.seen_answers.add(normalize(a))
                answers[i] = a
        live = list(answers)

        # step 2: critique + correction
        fixes: dict[int, dict] = {}
        gens = self.backend.generate(
            [correction_messages(self.c, items[i]["query"], answers[i]) for i in live], self.params)
        for i, g in zip(live, gens):
            p = parse_fields(g.text, ("critique", "correction"), g.finish_reason) if g.error is None else None
            if p is None or p.values is None:
                out[i] = self.failed_generation(items[i], "correction", g, p and p.reason,
                                                p.detail if p else "", answer=answers[i])
                continue
            prob = self.text_problem(p.values["correction"], cfg.min_chars, cfg.max_chars)
            if prob:
                out[i] = self.reject(items[i], "correction", *prob, answer=answers[i], **p.values)
            else:
                fixes[i] = p.values
        live = list(fixes)

        # step 3: a correction that is nearly the answer teaches nothing
        sims = pair_cosine(self.embedder, [answers[i] for i in live], [fixes[i]["correction"] for i in live])
        for i, s in zip(live, sims):
            s = round(float(s), 4)
            if s >= cfg.similarity_threshold:
                out[i] = self.reject(items[i], "pair", "correction_too_similar",
                                     f"cosine {s:.3f} >= {cfg.similarity_threshold}",
                                     answer=answers[i], similarity=s, **fixes[i])
            else:
                out[i] = self.record(items[i], answer=answers[i], similarity=s, **fixes[i])
        return [out[i] for i in range(len(items))]


def training_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Journal records -> (inspector rows, aligner rows) in the project's schemas."""
    inspector, aligner = [], []
    for r in records:
        if r.get("status") != "kept":
            continue
        prov = {"criterion": r["criterion"], "backend": r["backend"], "model": r["model"],
                "prompt_version": r["prompt_version"], "critique": r["critique"], "key": r["key"]}
        src = f"synth:{r['criterion']}"
        inspector.append({"query": r["query"], "answer": r["answer"], "label": 1, "source": src, **prov})
        inspector.append({"query": r["query"], "answer": r["correction"], "label": 0, "source": src, **prov})
        aligner.append({"query": r["query"], "answer": r["answer"], "correction": r["correction"],
                        "source": src, **prov})
    return inspector, aligner


def output_paths(out: str | Path, inspector_out: str | Path | None = None,
                 aligner_out: str | Path | None = None) -> tuple[Path, Path]:
    """The inspector and aligner files for journal ``out``; refuses a clash, which would overwrite
    the journal (every generated record) or one output with the other."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the journal's file name, e.g. {out / 'harm.jsonl'}")
    paths = {"--out (the journal)": out,
             "--inspector-out": Path(inspector_out) if inspector_out else sibling(out, "inspector"),
             "--aligner-out": Path(aligner_out) if aligner_out else sibling(out, "aligner"),
             "the self-instruct query pool": sibling(out, "queries")}
    seen: dict[Path, str] = {}
    for name, path in paths.items():
        key = path.expanduser().resolve()
        if key in seen:
            raise ValueError(f"{name} and {seen[key]} are the same file ({path}); give each its own")
        seen[key] = name
    return paths["--inspector-out"], paths["--aligner-out"]


def export(out: str | Path, inspector_out: str | Path | None = None,
           aligner_out: str | Path | None = None) -> dict:
    """Rebuild the derived training files from a journal; returns their paths and row counts."""
    ip, ap = output_paths(out, inspector_out, aligner_out)
    if not Path(out).is_file():
        raise ValueError(f"journal {out} not found: give the --out of an earlier `python -m synth generate`")
    records = list(Journal(out).load().values())
    ins, ali = training_rows(records)
    write_jsonl_atomic(ip, ins)
    write_jsonl_atomic(ap, ali)
    return {"inspector": str(ip), "aligner": str(ap), "inspector_rows": len(ins), "aligner_rows": len(ali)}


def summarize(records: list[dict], extra_duplicates: int = 0) -> dict:
    kept = sum(r.get("status") == "kept" for r in records)
    filtered = Counter(r.get("reason") or "unknown" for r in records if r.get("status") != "kept")
    if extra_duplicates:
        filtered["duplicate"] += extra_duplicates
    order = {k: i for i, k in enumerate(REASONS)}
    return {"kept": kept,
            "filtered": dict(sorted(filtered.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))}


def format_summary(s: dict) -> str:
    lines = [f"synth {s['criterion']}: {s['records']} records in {s['outputs']['journal']} "
             f"({s['new']} new this run, {s['resumed']} done earlier)",
             f"  kept: {s['kept']}"]
    total_f = sum(s["filtered"].values())
    lines.append(f"  filtered: {total_f}" + "".join(f"\n    {k}: {v}" for k, v in s["filtered"].items()))
    if "backend_error" in s["filtered"]:
        lines.append("  (backend_error items are retried by the next run with the same arguments)")
    if s.get("self_instruct"):
        si = s["self_instruct"]
        lines.append(f"  self-instruct: {si['queries']} queries from {si['topics']} topics, "
                     f"{si['calls']} calls ({si['failed_calls']} unparsable)")
    lines.append(f"  inspector rows: {s['outputs']['inspector_rows']} -> {s['outputs']['inspector']}")
    lines.append(f"  aligner rows:   {s['outputs']['aligner_rows']} -> {s['outputs']['aligner']}")
    if s.get("interrupted"):
        lines.append("  INTERRUPTED: rerun the same command to continue")
    return "\n".join(lines)


def generate(criterion: str | Criterion, backend: Backend, out: str | Path,
             config: GenerateConfig | None = None, queries: str | Path | list[str] | None = None,
             query_field: str = "query", shuffle_queries: bool = False,
             inspector_out: str | Path | None = None, aligner_out: str | Path | None = None,
             embedder: Embedder | None = None, progress: bool = True,
             on_record: Callable[[dict], None] | None = None, echo: bool = True) -> dict:
    """Run (or resume) generation; returns the summary dict (also printed when ``echo``).

    ``queries``: a file path or a list of strings; ``None`` means self-instruct from the
    criterion's seed questions. ``on_record`` is called after each record is flushed.
    Raises :class:`Interrupted` (a ``KeyboardInterrupt``) on Ctrl-C, after saving.
    """
    cfg = config or GenerateConfig()
    c = criterion if isinstance(criterion, Criterion) else load_criterion(criterion)
    embedder = embedder or Embedder()
    out = Path(out)
    output_paths(out, inspector_out, aligner_out)  # a clash is refused before any generation
    journal = Journal(out)
    existing = journal.load()
    others = {r.get("criterion") for r in existing.values()} - {c.name}
    if others:
        raise ValueError(f"{out} already holds records of criterion {sorted(others)}; "
                         f"use a separate --out file per criterion")
    params = GenParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)

    si_stats = None
    if queries is None:
        items, si_stats = self_instruct(backend, c, cfg.n, sibling(out, "queries"), params,
                                        seed=cfg.seed or 0, questions_per_topic=cfg.questions_per_topic,
                                        progress=progress)
    else:
        if isinstance(queries, (str, Path)):
            src = f"file:{Path(queries).name}"
            qs = load_queries(queries, query_field, limit=cfg.n,
                              shuffle_seed=(cfg.seed or 0) if shuffle_queries else None)
        else:
            src, qs = "list", list(queries)[: cfg.n]
        items = [{"query": q, "topic": None, "query_source": src} for q in qs]

    # identical inputs share a key: one record, the repeats are reported as duplicates
    todo, keys, repeats = [], set(), 0
    resumed = 0
    for it in items:
        it["key"] = item_key(c, it["query"])
        if it["key"] in keys:
            repeats += 1
            continue
        keys.add(it["key"])
        prev = existing.get(it["key"])
        if prev is None or prev.get("status") == "error" or (
                cfg.retry_failed and prev.get("status") == "filtered"
                and prev.get("stage") in ("answer", "correction", "pair")):
            todo.append(it)
        else:
            resumed += 1
    redo = {it["key"] for it in todo}
    run = _Run(c, backend, cfg, embedder)
    run.absorb([r for k, r in existing.items() if k not in redo], progress)

    _ = embedder.model  # load before the progress bar starts, so its rate means something
    chunk = max(1, cfg.chunk_size or backend.chunk_size)
    new = 0
    interrupted = False
    unusable = None  # the backend failed every request of the run's first chunk
    bar = tqdm(total=len(todo), desc=f"synth {c.name}", unit="query", disable=not progress)
    try:
        for s in range(0, len(todo), chunk):
            recs = run.process(todo[s:s + chunk])
            stop = None
            for rec in recs:  # a Ctrl-C while writing still lets the finished chunk reach disk
                try:
                    journal.append(rec)
                    existing.pop(rec["key"], None)
                    existing[rec["key"]] = rec
                    new += 1
                    bar.update(1)
                    if on_record is not None:
                        on_record(rec)
                except KeyboardInterrupt as e:
                    stop = e
            if stop is not None:
                raise stop
            if new == len(recs) and all(r["status"] == "error" for r in recs):
                unusable = recs[0]["detail"]
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        journal.close()

    outputs = {"journal": str(out),
               **export(out, inspector_out, aligner_out)}
    summary = {"criterion": c.name, "backend": backend.kind, "model": backend.model,
               "prompt_version": PROMPT_VERSION, "records": len(existing), "new": new,
               "resumed": resumed, **summarize(list(existing.values()), repeats),
               "self_instruct": si_stats, "interrupted": interrupted, "outputs": outputs}
    if echo:
        print(format_summary(summary), flush=True)
    if interrupted:
        raise Interrupted(summary)
    if unusable is not None:
        raise BackendError(f"{backend.kind} backend {backend.model}: every request of the first "
                           f"chunk failed ({unusable}); stopped early, rerun once it is reachable")
    return summary
