"""Where queries come from: a file (a table as ``pipeline.tables`` reads it, or TXT), or
self-instruct from the criterion's seed questions (topics first, then questions per topic, as in
Ngweta et al. 2024).

The self-instruct pool is journaled to ``OUT.queries.jsonl`` line by line, so a rerun reuses the
queries it already has (their keys, and so their finished work, stay the same) and only asks the
model for the ones still missing.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.tables import InputError, check_text, format_of, input_columns, read_rows, require_columns

from .backends import Backend, GenParams
from .criteria import Criterion
from .filters import normalize
from .journal import Journal, read_jsonl
from .prompts import PROMPT_VERSION, parse_list, questions_messages, topics_messages

log = logging.getLogger(__name__)


class QueryFileError(ValueError):
    """A queries file row lacks the query field or is not readable; the message names the row."""


def load_queries(path: str | Path, field: str = "query", limit: int | None = None,
                  shuffle_seed: int | None = None) -> list[str]:
    """Queries from a table (column ``field``), read by ``pipeline.tables`` with the formats and
    rules every reader shares: ``.jsonl``, ``.json`` (a JSON array of objects), ``.csv``, ``.tsv``,
    ``.parquet``, the text formats also ``.gz``; any other extension (``.txt``) holds one query per
    non-blank line.

    ``limit`` keeps the first N (after shuffling with ``shuffle_seed`` when given, which reads the
    whole file; the same seed gives the same sample, so reruns resume).
    """
    path = Path(path)
    if not path.is_file():
        raise QueryFileError(f"queries file not found: {path}")
    stop = None if shuffle_seed is not None else limit
    try:
        format_of(path)
    except InputError:  # not a table: one query per line
        try:
            out = _read_lines(path, stop)
        except UnicodeDecodeError as e:
            raise QueryFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    else:
        try:
            out = _read_table_queries(path, field, stop)
        except InputError as e:
            raise QueryFileError(str(e)) from None
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(out)
        out = out[:limit] if limit is not None else out
    return out


def _read_table_queries(path: Path, field: str, stop: int | None) -> list[str]:
    hint = "use --query-field to pick another"
    columns = input_columns(path)
    if columns:  # a CSV header or Parquet schema names its columns up front
        require_columns(columns, [field], path, hint)
    out: list[str] = []
    for n, row in enumerate(read_rows(path), 1):
        if stop is not None and len(out) >= stop:
            break
        try:
            out.append(check_text(row.get(field), field).strip())
        except ValueError as e:
            raise QueryFileError(f"{path}: row {n}: {e}; {hint}") from None
    return out


def _read_lines(path: Path, stop: int | None) -> list[str]:
    out: list[str] = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: Excel's BOM is not part of the first query
        for line in f:
            if stop is not None and len(out) >= stop:
                break
            if line.strip():
                out.append(line.strip())
    return out


def self_instruct(backend: Backend, criterion: Criterion, n: int, pool_path: str | Path,
                  params: GenParams, seed: int = 0, questions_per_topic: int = 5,
                  topics_per_call: int = 10, progress: bool = True) -> tuple[list[dict], dict]:
    """Grow the journaled pool to ``n`` distinct queries; returns (first n items, stats).

    Gives up after a bounded number of calls (a model that never returns parsable lists must
    not loop forever) and returns what it has; stats say how many calls failed and why.
    """
    journal = Journal(pool_path)
    topics: list[str] = []
    items: list[dict] = []
    rows, _ = read_jsonl(Path(pool_path))
    for r in rows:
        if r.get("criterion") != criterion.name or r.get("prompt_version") != PROMPT_VERSION:
            continue
        if r.get("kind") == "topic" and isinstance(r.get("topic"), str):
            topics.append(r["topic"])
        elif r.get("kind") == "query" and isinstance(r.get("query"), str):
            items.append({"query": r["query"], "topic": r.get("topic"), "query_source": "self-instruct"})
    seen_q = {normalize(it["query"]) for it in items}
    seen_t = {normalize(t) for t in topics}
    uses = {t: 0 for t in topics}
    for it in items:
        if it["topic"] in uses:
            uses[it["topic"]] += 1
    stats = {"calls": 0, "failed_calls": 0, "duplicate_queries": 0, "topics": len(topics),
             "reused_queries": len(items)}
    if len(items) >= n:
        stats["queries"] = len(items)
        return items[:n], stats
    rng = random.Random(seed * 1_000_003 + len(items))
    batch = max(1, backend.chunk_size)
    max_calls = 3 * (math.ceil((n - len(items)) / questions_per_topic) + 2)
    base = {"criterion": criterion.name, "prompt_version": PROMPT_VERSION,
            "backend": backend.kind, "model": backend.model}
    bar = tqdm(total=n, initial=len(items), desc=f"self-instruct {criterion.name}", unit="query",
               disable=not progress)
    try:
        while len(items) < n and stats["calls"] < max_calls:
            need_topics = math.ceil((n - len(items)) / questions_per_topic)
            fresh = [t for t in topics if uses[t] == 0]
            if len(fresh) < need_topics:
                calls = min(batch, math.ceil((need_topics - len(fresh)) / topics_per_call))
                convs = [topics_messages(criterion, topics_per_call, topics, rng) for _ in range(calls)]
                for g in backend.generate(convs, params):
                    stats["calls"] += 1
                    got, why = parse_list(g.text, "topics") if g.error is None else ([], "error")
                    if why:
                        stats["failed_calls"] += 1
                    for t in got:
                        if len(t) <= 200 and normalize(t) and normalize(t) not in seen_t:
                            seen_t.add(normalize(t))
                            topics.append(t)
                            uses[t] = 0
                            journal.append({**base, "kind": "topic", "topic": t})
            if not topics:
                continue
            ranked = sorted(topics, key=lambda t: uses[t])
            chosen = ranked[: min(batch, need_topics)]
            convs = [questions_messages(criterion, t, questions_per_topic, rng) for t in chosen]
            for t, g in zip(chosen, backend.generate(convs, params)):
                stats["calls"] += 1
                uses[t] += 1  # an attempt counts, so a topic the model chokes on is not retried first
                got, why = parse_list(g.text, "questions") if g.error is None else ([], "error")
                if why:
                    stats["failed_calls"] += 1
                for q in got:
                    key = normalize(q)
                    if not key or key in seen_q:
                        stats["duplicate_queries"] += 1
                        continue
                    seen_q.add(key)
                    items.append({"query": q, "topic": t, "query_source": "self-instruct"})
                    journal.append({**base, "kind": "query", "topic": t, "query": q})
                    bar.update(1)
    finally:
        journal.close()
        bar.close()
    stats["topics"] = len(topics)
    stats["queries"] = len(items)
    if len(items) < n:
        log.warning("self-instruct produced %d of %d queries in %d calls (%d unparsable); "
                    "try a stronger model or --queries FILE", len(items), n, stats["calls"],
                    stats["failed_calls"])
    return items[:n], stats
