"""Batch scoring of chatbot logs: ``python -m pipeline.batch INPUT --out OUTPUT``.

Every input row comes out, in input order, with all its columns plus ``inspector_score``,
``flagged``, ``corrected_answer``, ``corrected_score``, ``fallback``, ``reason`` (why a flagged
row's correction is not shown: ``no_aligner``, ``aligner_error``, ``timeout``, ``still_flagged``,
...) and ``error``. A row that cannot be scored (a missing, empty or non-string query/answer, a
record that cannot be read) gets an ``error`` saying why (a bad record: with its line number) and
is never dropped; the job itself fails only when the input cannot be read at all. Blank lines are
no rows: they are skipped and counted in the summary printed at the end (``blank_lines``; the local
engine only). Rows are read, scored and written in chunks, so memory stays bounded whatever the
log's size. A number JSON cannot hold (NaN, or 1e999 read as infinity) in a log's own field is
written as null (JSONL, CSV); temporary files that a killed run left beside ``--out`` are removed
when the next run for it starts (``pipeline.io``).

Input formats by extension: .jsonl, .json (one JSON array of objects), .csv, .tsv, .parquet, and
the text ones gzip-compressed (.jsonl.gz, ...); output: .jsonl, .csv, .parquet. The input is read
by ``pipeline.tables``, with the rules inspector/aligner training use too. A row may hold the pair
in two columns (``--query-col``/``--answer-col``) or as a chat transcript in ``messages`` (a list
of ``{role, content}``: the last user turn is the query, the last assistant turn the answer).
docs/batch.md has the whole contract.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .env import offline_by_default
from .jobs import OUTPUT_COLUMNS, Summary, build_pipeline, process_rows, run_batch
from .tables import InputError, extract_pair, format_of

# what callers of the batch job import from here (the code lives in pipeline.jobs / pipeline.tables)
__all__ = ["OUTPUT_COLUMNS", "Summary", "build_pipeline", "extract_pair", "main", "process_rows", "run_batch"]


def resolve_aligner(choice: str | None, fallback: str) -> str | None:
    """'auto' -> the small aligner built by `make aligner` if present; 'none' -> no aligner."""
    if choice in (None, "", "none"):
        return None
    if choice != "auto":
        return choice
    from aligner import HOW_TO_GET_DEFAULT, find_default_aligner

    found = find_default_aligner()
    if found is None:
        print(f"note: {HOW_TO_GET_DEFAULT}; flagged rows get the {fallback} fallback", file=sys.stderr)
        return None
    print(f"using the aligner at {found}", file=sys.stderr)
    return str(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.batch", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="log file: .jsonl, .json, .csv, .tsv or .parquet (text formats also .gz)")
    ap.add_argument("--out", required=True, help="output file: .jsonl, .csv or .parquet")
    ap.add_argument("--inspector", default=None, help="inspector folder (default: the bundled one)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="override the inspector's stored threshold (a probability in [0, 1])")
    ap.add_argument("--query-col", default="query")
    ap.add_argument("--answer-col", default="answer")
    ap.add_argument("--aligner", default="auto", metavar="ID|PATH|auto|none",
                    help="aligner checkpoint (HF id or folder); 'auto' (default) uses models/aligner-small "
                         "when `make aligner` has built it; 'none' = flagged rows get the fallback")
    ap.add_argument("--fallback", default="fail_open", choices=["fail_open", "fail_closed"],
                    help="what flagged rows show when no usable correction exists (default fail_open)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="aligner generation limit")
    ap.add_argument("--chunk-rows", type=int, default=256, help="rows read, scored and written at a time")
    ap.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="execution engine: local (one process) or ray (Ray Data, see pipeline/ray_engine.py)")
    ap.add_argument("--address", default=None,
                    help="with --engine ray: Ray cluster address (e.g. ray://HOST:10001 or auto); "
                         "default: a local Ray started for the job")
    ap.add_argument("--int8", action="store_true",
                    help="score with the int8-quantised encoder: ~1.4x faster on CPU, scores move a little "
                         "(README, 'int8'); re-tune --threshold on it")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    offline_by_default()  # the entry point decides, before any model loads (not an import)
    if args.chunk_rows < 1:
        ap.error(f"--chunk-rows must be at least 1, got {args.chunk_rows}")

    try:
        format_of(args.input)
        format_of(args.out, "output")
        args.aligner = resolve_aligner(args.aligner, args.fallback)
        if args.engine == "ray":
            from .ray_engine import require_ray_data, run_ray_batch

            try:
                require_ray_data()
            except ImportError as e:  # the [ray] extra is not installed: say so, no traceback
                print(f"error: {e}", file=sys.stderr)
                return 2
            summary = run_ray_batch(args.input, args.out, inspector_dir=args.inspector,
                                    threshold=args.threshold, aligner=args.aligner, fallback=args.fallback,
                                    max_new_tokens=args.max_new_tokens, query_col=args.query_col,
                                    answer_col=args.answer_col, chunk_rows=args.chunk_rows,
                                    address=args.address, int8=args.int8, show_progress=not args.no_progress)
        else:
            if not Path(args.input).exists():
                raise InputError(f"{args.input}: no such file")
            pipeline = build_pipeline(args.inspector, args.threshold, args.aligner, args.fallback,
                                      args.max_new_tokens, int8=args.int8)
            summary = run_batch(args.input, args.out, pipeline, args.query_col, args.answer_col,
                                args.chunk_rows, show_progress=not args.no_progress)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(args.out), **summary.to_dict()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
