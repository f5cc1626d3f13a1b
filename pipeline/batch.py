"""Batch scoring of chatbot logs: ``python -m pipeline.batch INPUT --out OUTPUT``.

Every input row comes out, in input order, with all its columns plus ``inspector_score``,
``flagged``, ``corrected_answer``, ``corrected_score``, ``fallback`` and ``error``. A row that cannot
be scored (a missing, empty or non-string query/answer, a line that is not JSON or is nested too
deeply to parse) gets an ``error`` saying why (a bad line: with its line number) and is never
dropped; the job itself fails only when the input cannot be read at all. Blank lines are no rows:
they are skipped and counted in the summary printed at the end (``blank_lines``; the local engine
only). Rows are read, scored and written in chunks, so memory stays bounded whatever the log's size.
A number JSON cannot hold (NaN, or 1e999 read as infinity) in a log's own field is written as null
(JSONL, CSV); temporary files that a killed run left beside ``--out`` are removed when the next run
for it starts (``pipeline.io``).

Formats by extension, in and out: .jsonl, .csv, .parquet. A row may hold the pair in two columns
(``--query-col``/``--answer-col``) or as a chat transcript in ``messages`` (a list of
``{role, content}``: the last user turn is the query, the last assistant turn the answer).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from inspector import check_unicode

from .io import InputError, RowWriter, count_rows, format_of, input_columns, is_uri, read_chunks
from .core import ModerationPipeline
from .env import offline_by_default
from .routing import PipelineConfig

OUTPUT_COLUMNS = ("inspector_score", "flagged", "corrected_answer", "corrected_score", "fallback", "error")


def extract_pair(row: dict, query_col: str = "query", answer_col: str = "answer",
                 messages_col: str = "messages") -> tuple[str, str]:
    """(query, answer) from a row, or ValueError naming the field and what was expected."""
    messages = row.get(messages_col)
    # a blank cell is no value: a CSV with query, answer and messages columns leaves one side empty
    has_columns = any(v is not None and not (isinstance(v, str) and not v.strip())
                      for v in (row.get(query_col), row.get(answer_col)))
    if has_columns or messages is None or (isinstance(messages, str) and not messages.strip()):
        q, a = row.get(query_col), row.get(answer_col)
        for name, v in ((query_col, q), (answer_col, a)):
            if v is None:
                raise ValueError(f"field {name!r} is missing; expected a non-empty string "
                                 f"(or a {messages_col!r} list of {{role, content}})")
            if not isinstance(v, str):
                raise ValueError(f"field {name!r} must be a string, got {type(v).__name__}")
            if not v.strip():
                raise ValueError(f"field {name!r} is empty")
            check_unicode(v, f"field {name!r}")
        return q, a
    return _pair_from_messages(messages, messages_col)


def _pair_from_messages(messages, col: str) -> tuple[str, str]:
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except (ValueError, RecursionError):  # not JSON, a 5,000-digit number, nested too deep
            raise ValueError(f"field {col!r} must be a list of {{role, content}} (or its JSON text)") from None
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if not isinstance(messages, list):
        raise ValueError(f"field {col!r} must be a list of {{role, content}}, got {type(messages).__name__}")
    last = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{col}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise ValueError(f"{col}[{i}] role must be a string, got {type(m['role']).__name__}")
        last[m["role"]] = (i, m["content"])
    if "user" not in last or "assistant" not in last:
        raise ValueError(f"field {col!r} needs at least one 'user' and one 'assistant' turn")
    for role in ("user", "assistant"):
        i, content = last[role]
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{col}[{i}] ({role}) content must be a non-empty string")
        check_unicode(content, f"{col}[{i}] ({role}) content")
    return last["user"][1], last["assistant"][1]


@dataclass
class Summary:
    rows: int = 0
    scored: int = 0
    flagged: int = 0
    corrected: int = 0
    fallbacks: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_examples: list = field(default_factory=list)
    blank_lines: int | None = None  # blank input lines skipped (None: not counted, the Ray engine)

    def to_dict(self) -> dict:
        d = {"rows": self.rows, "scored": self.scored, "flagged": self.flagged,
             "flagged_pct": round(100.0 * self.flagged / self.scored, 2) if self.scored else 0.0,
             "corrected": self.corrected, "fallbacks": self.fallbacks, "errors": self.errors,
             "seconds": round(self.seconds, 2),
             "pairs_per_s": round(self.scored / self.seconds, 2) if self.seconds else 0.0}
        if self.blank_lines is not None:
            d["blank_lines"] = self.blank_lines
        if self.error_examples:
            d["first_errors"] = self.error_examples
        return d


def output_schema_hint(input_path: str | Path):
    """Arrow types for Parquet output: the input's own (a Parquet input's, its clashing names as
    ``input_*``) and the annotation columns', so even an output without rows has a typed schema."""
    import pyarrow as pa

    fields = []
    if format_of(input_path, "input") == "parquet" and not is_uri(input_path):
        import pyarrow.parquet as pq

        fields = [f.with_name(f"input_{f.name}") if f.name in OUTPUT_COLUMNS else f
                  for f in pq.read_schema(input_path)]
    types = {"inspector_score": pa.float64(), "flagged": pa.bool_(), "corrected_answer": pa.string(),
             "corrected_score": pa.float64(), "fallback": pa.string(), "error": pa.string()}
    return pa.schema(fields + [pa.field(c, types[c]) for c in OUTPUT_COLUMNS])


def output_columns(input_path: str | Path) -> list[str]:
    """The output's columns as far as the input's header tells them (see ``process_rows``)."""
    cols = [f"input_{c}" if c in OUTPUT_COLUMNS else c for c in input_columns(input_path)]
    return cols + list(OUTPUT_COLUMNS)


def process_rows(rows: list[dict], pipeline: ModerationPipeline, query_col: str, answer_col: str,
                 summary: Summary) -> list[dict]:
    """Annotate one chunk of rows in place order; errors stay on their row."""
    pairs, idx = [], []
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        err = row.pop("_error", None)
        for col in OUTPUT_COLUMNS:  # the log's own `error`, `flagged`, ... columns are kept as input_*
            value = row.pop(col, None)
            if value is not None and f"input_{col}" not in row:
                row[f"input_{col}"] = value
        row.update(dict.fromkeys(OUTPUT_COLUMNS))
        if err is None:
            try:
                pairs.append(extract_pair(row, query_col, answer_col))
                idx.append(i)
            except ValueError as e:
                err = f"row {summary.rows + i + 1}: {e}"
        row["error"] = err
        out.append(row)
    if pairs:
        try:
            results = pipeline.moderate([q for q, _ in pairs], [a for _, a in pairs])
        except Exception as e:  # noqa: BLE001 - a failing model must not lose rows
            for i in idx:
                out[i]["error"] = f"scoring failed: {type(e).__name__}: {e}"
            results = []
        for i, r in zip(idx, results):
            row = out[i]
            if r.error is not None:  # the inspector failed on this pair alone
                row["error"] = f"row {summary.rows + i + 1}: scoring failed: {r.error}"
                continue
            row["inspector_score"] = r.score
            row["flagged"] = r.flagged
            row["corrected_answer"] = r.corrected_answer
            row["corrected_score"] = r.corrected_score
            row["fallback"] = r.fallback
            summary.scored += 1
            summary.flagged += int(r.flagged)
            summary.corrected += int(r.corrected)
            summary.fallbacks += int(r.fallback is not None)
    for row in out:
        if row["error"] is not None:
            summary.errors += 1
            if len(summary.error_examples) < 5:
                summary.error_examples.append(row["error"])
    summary.rows += len(rows)
    return out


def run_batch(input_path: str | Path, output_path: str | Path, pipeline: ModerationPipeline,
              query_col: str = "query", answer_col: str = "answer", chunk_rows: int = 256,
              show_progress: bool = True) -> Summary:
    """Stream ``input_path`` through ``pipeline`` into ``output_path``; returns the summary."""
    from tqdm.auto import tqdm

    format_of(output_path, "output")
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise InputError("--out must differ from the input file")
    stats: dict = {}
    chunks = read_chunks(input_path, chunk_rows, stats)
    summary = Summary(blank_lines=0)
    writer = RowWriter(output_path, schema_hint=output_schema_hint(input_path),
                       empty_columns=output_columns(input_path))
    t0 = time.perf_counter()
    try:
        with tqdm(total=count_rows(input_path), unit="row", desc="moderating",
                  disable=not show_progress) as bar:
            for rows in chunks:
                writer.write(process_rows(rows, pipeline, query_col, answer_col, summary))
                bar.update(len(rows))
                bar.set_postfix(flagged=summary.flagged, errors=summary.errors)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.blank_lines = stats.get("blank_lines", 0)
    summary.seconds = time.perf_counter() - t0
    return summary


def build_pipeline(inspector_dir: str | None, threshold: float | None, aligner: str | None,
                   fallback: str, max_new_tokens: int | None = None, int8: bool = False) -> ModerationPipeline:
    from inspector import Inspector

    insp = Inspector.load(inspector_dir, int8=int8)
    model = None
    if aligner:
        from aligner import Aligner

        model = Aligner.load(aligner)
    return ModerationPipeline(insp, model, PipelineConfig(threshold=threshold, fallback=fallback,
                                                          max_new_tokens=max_new_tokens))


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
    ap.add_argument("input", help="log file: .jsonl, .csv or .parquet")
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
        format_of(args.input, "input")
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
                raise InputError(f"input {args.input}: no such file")
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
