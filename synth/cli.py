"""``python -m synth``: generate | export | criteria.

    python -m synth generate --criterion harmlessness --backend openai:http://127.0.0.1:8000/v1 \\
        --n 1000 --out data/harm.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synth", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="generate (or resume) misaligned/corrected pairs for one criterion")
    g.add_argument("--criterion", required=True, help="bundled name (see `criteria`) or a .json path")
    g.add_argument("--backend", required=True, help="hf:MODEL_ID_OR_PATH or openai:BASE_URL (…/v1)")
    g.add_argument("--model", help="model name sent to an openai backend (default: first of GET /models)")
    g.add_argument("--n", type=int, required=True, help="number of queries to process (kept <= n)")
    g.add_argument("--out", required=True, help="journal JSONL (one record per query; resumable)")
    g.add_argument("--inspector-out", help="inspector rows (default: OUT with .inspector.jsonl)")
    g.add_argument("--aligner-out", help="aligner rows (default: OUT with .aligner.jsonl)")
    g.add_argument("--queries", help="take queries from this file (JSONL, JSON array, CSV, TSV, Parquet, or TXT: one per line) instead of self-instruct")
    g.add_argument("--query-field", default="query", help="field/column of --queries holding the query")
    g.add_argument("--shuffle", action="store_true", help="sample --queries at random (with --seed)")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=8, help="hf: prompts per generate() call")
    g.add_argument("--device", help="hf: torch device (default cuda if available)")
    g.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    g.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    g.add_argument("--max-retries", type=int, default=5, help="openai: retries on 429/5xx/timeouts")
    g.add_argument("--backoff", type=float, default=1.0, help="openai: first retry delay, doubled each time")
    g.add_argument("--chunk-size", type=int, help="items per step (default: batch size for hf, "
                                                  "2 x concurrency for openai)")
    g.add_argument("--min-chars", type=int, default=10, help="answer/correction minimum length")
    g.add_argument("--max-chars", type=int, default=4000, help="answer/correction maximum length")
    g.add_argument("--language", default="en", choices=["en", "any"], help="'any' disables the check")
    g.add_argument("--near-dup-threshold", type=float, default=0.9, help="query cosine for near duplicates")
    g.add_argument("--similarity-threshold", type=float, default=0.9,
                   help="answer/correction cosine at or above which a pair is dropped")
    g.add_argument("--embedder", help="sentence-transformers model for the cosine filters (default MiniLM)")
    g.add_argument("--retry-failed", action="store_true",
                   help="also redo items filtered at the answer/correction steps")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--json", action="store_true", help="print the summary as JSON too")

    e = sub.add_parser("export", help="rebuild the inspector/aligner files from a journal")
    e.add_argument("--out", required=True)
    e.add_argument("--inspector-out")
    e.add_argument("--aligner-out")

    sub.add_parser("criteria", help="list the bundled criteria")
    return p


def main(argv: list[str] | None = None, embedder=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "generate":  # the backend's numbers, before anything loads (a negative backoff
        from aligner.options import check_ranges  # used to end the run at its first retry)

        check_ranges(parser, args, {"batch_size": (1, None, False), "concurrency": (1, None, False),
                                    "max_retries": (0, None, False), "timeout": (0, None, True),
                                    "backoff": (0, None, False)})
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("synth").setLevel(logging.INFO)  # not httpx's line per request
    from .backends import BackendError, make_backend
    from .criteria import CriterionError, list_criteria, load_criterion
    from .queries import QueryFileError

    if args.cmd == "criteria":
        for name in list_criteria():
            c = load_criterion(name)
            print(f"{name}: {c.description}")
        return 0
    from .generate import GenerateConfig, Interrupted, export, generate

    if args.cmd == "export":
        try:
            print(json.dumps(export(args.out, args.inspector_out, args.aligner_out), indent=2))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    from .filters import Embedder

    backend = None
    try:
        criterion = load_criterion(args.criterion)
        cfg = GenerateConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, min_chars=args.min_chars,
                             max_chars=args.max_chars, language=None if args.language == "any" else "en",
                             near_dup_threshold=args.near_dup_threshold,
                             similarity_threshold=args.similarity_threshold,
                             retry_failed=args.retry_failed, chunk_size=args.chunk_size)
        backend = make_backend(args.backend, model=args.model, batch_size=args.batch_size,
                               concurrency=args.concurrency, timeout=args.timeout,
                               max_retries=args.max_retries, backoff=args.backoff, device=args.device)
        if embedder is None:
            embedder = Embedder(args.embedder)
            embedder.encode(["check"])  # a wrong --embedder fails now, not after the LLM calls
        summary = generate(criterion, backend, args.out, cfg, queries=args.queries,
                           query_field=args.query_field, shuffle_queries=args.shuffle,
                           inspector_out=args.inspector_out, aligner_out=args.aligner_out,
                           embedder=embedder, progress=not args.no_progress)
    except KeyboardInterrupt as e:  # Interrupted (main loop) or a plain one (self-instruct, loading)
        if not isinstance(e, Interrupted):
            print("interrupted before the main loop; the self-instruct pool so far is saved", file=sys.stderr)
        print("interrupted: finished rows are saved; rerun the same command to continue", file=sys.stderr)
        return 130
    except (CriterionError, QueryFileError, BackendError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if backend is not None:
            backend.close()
    if args.json:
        print(json.dumps(summary))
    return 0
