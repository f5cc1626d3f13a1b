"""The batch job's parts that both engines share (``pipeline.batch``'s local engine and
``pipeline.ray_engine``): annotating rows, the output's columns and Parquet schema, the summary.

Every input row comes out once, in input order, with its own columns (a log's column named like an
output column kept as ``input_<name>``) plus ``OUTPUT_COLUMNS``. ``reason`` says why a flagged
row's correction is not shown (``aligner.results.Reason``: ``no_aligner``, ``aligner_error``,
``timeout``, ``still_flagged``, ...); it is empty when the correction is shown or the row is not
flagged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .core import ModerationPipeline
from .io import RowWriter, settled, unify_types, value_type
from .routing import PipelineConfig
from .tables import (TEXT_FORMATS, InputError, count_rows, extract_pair, format_of, input_columns, input_schema,
                     is_uri, read_chunks)

OUTPUT_COLUMNS = ("inspector_score", "flagged", "corrected_answer", "corrected_score", "fallback", "reason", "error")


def output_types() -> dict:
    import pyarrow as pa

    return {"inspector_score": pa.float64(), "flagged": pa.bool_(), "corrected_answer": pa.string(),
            "corrected_score": pa.float64(), "fallback": pa.string(), "reason": pa.string(), "error": pa.string()}


@dataclass
class Summary:
    """What the job prints at the end; ``add`` counts finished rows (both engines, the same way)."""

    rows: int = 0
    scored: int = 0
    flagged: int = 0
    corrected: int = 0
    fallbacks: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_examples: list = field(default_factory=list)
    fallback_reasons: dict = field(default_factory=dict)  # Reason value -> rows
    blank_lines: int | None = None  # blank input lines skipped (None: not counted, the Ray engine)

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.rows += 1
            if r.get("error") is not None:
                self.errors += 1
                if len(self.error_examples) < 5:
                    self.error_examples.append(r["error"])
                continue
            self.scored += 1
            if r.get("flagged"):
                self.flagged += 1
                self.corrected += int(r.get("fallback") is None)
            if r.get("fallback") is not None:
                self.fallbacks += 1
                reason = r.get("reason") or "unknown"
                self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1

    def to_dict(self) -> dict:
        d = {"rows": self.rows, "scored": self.scored, "flagged": self.flagged,
             "flagged_pct": round(100.0 * self.flagged / self.scored, 2) if self.scored else 0.0,
             "corrected": self.corrected, "fallbacks": self.fallbacks, "errors": self.errors,
             "seconds": round(self.seconds, 2),
             "pairs_per_s": round(self.scored / self.seconds, 2) if self.seconds else 0.0}
        if self.fallback_reasons:
            d["fallback_reasons"] = dict(sorted(self.fallback_reasons.items()))
        if self.blank_lines is not None:
            d["blank_lines"] = self.blank_lines
        if self.error_examples:
            d["first_errors"] = self.error_examples
        return d


def input_part(row: dict) -> tuple[dict, str | None]:
    """(the row's own columns as the output holds them, its read error): a log's ``error``,
    ``flagged``, ... columns become ``input_error``, ``input_flagged``, ..."""
    row = dict(row)
    err = row.pop("_error", None)
    for col in OUTPUT_COLUMNS:
        value = row.pop(col, None)
        if value is not None and f"input_{col}" not in row:
            row[f"input_{col}"] = value
    return row, err


def output_columns(input_path) -> list[str]:
    """The output's columns as far as the input's header tells them (CSV header, Parquet schema)."""
    cols = [f"input_{c}" if c in OUTPUT_COLUMNS else c for c in input_columns(input_path)]
    return cols + list(OUTPUT_COLUMNS)


def output_schema(input_path, local_path=None):
    """The Parquet output's Arrow schema, settled before the first row is written: a Parquet
    input's own types (its clashing names as ``input_*``); for a text input (JSONL, JSON, CSV) one
    pass over ``local_path`` (default: the input) finds every column and its type, so a field
    only late rows have keeps its column and a field whose type changes between rows (``1`` here,
    ``"abc"`` there) is text; then the annotation columns' types."""
    import pyarrow as pa

    types = output_types()
    fmt = format_of(input_path)
    if fmt == "parquet":
        schema = input_schema(input_path)
        fields = [f.with_name(f"input_{f.name}") if f.name in OUTPUT_COLUMNS else f for f in (schema or [])]
    else:
        assert fmt in TEXT_FORMATS
        found: dict = {c: None for c in output_columns(input_path) if c not in types}
        for rows in read_chunks(local_path or input_path, 4096):
            own = [input_part(r)[0] for r in rows]
            for name in dict.fromkeys(k for r in own for k in r):
                if found.get(name) != pa.string():  # text takes anything: no need to look again
                    found[name] = unify_types(found.get(name), value_type([r.get(name) for r in own]))
        fields = [pa.field(n, settled(t) if t is not None else pa.string()) for n, t in found.items()]
    return pa.schema(fields + [pa.field(c, types[c]) for c in OUTPUT_COLUMNS])


def process_rows(rows: list[dict], pipeline: ModerationPipeline, query_col: str, answer_col: str,
                 first_row: int = 0) -> list[dict]:
    """Annotate one chunk of rows in input order; errors stay on their row (numbered from
    ``first_row + 1``, the rows before the chunk)."""
    pairs, idx = [], []
    out = []
    for i, row in enumerate(rows):
        row, err = input_part(row)
        row.update(dict.fromkeys(OUTPUT_COLUMNS))
        if err is None:
            try:
                pairs.append(extract_pair(row, query_col, answer_col))
                idx.append(i)
            except ValueError as e:
                err = f"row {first_row + i + 1}: {e}"
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
                row["error"] = f"row {first_row + i + 1}: scoring failed: {r.error}"
                continue
            row["inspector_score"] = float(r.score)
            row["flagged"] = bool(r.flagged)
            row["corrected_answer"] = r.corrected_answer
            row["corrected_score"] = None if r.corrected_score is None else float(r.corrected_score)
            row["fallback"] = r.fallback
            row["reason"] = r.reason.value if r.reason is not None else None
    return out


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


def run_batch(input_path: str | Path, output_path: str | Path, pipeline: ModerationPipeline,
              query_col: str = "query", answer_col: str = "answer", chunk_rows: int = 256,
              show_progress: bool = True) -> Summary:
    """Stream ``input_path`` through ``pipeline`` into ``output_path`` (the local engine)."""
    from tqdm.auto import tqdm

    out_fmt = format_of(output_path, "output")
    if is_uri(input_path):
        raise InputError(f"{input_path}: the local engine reads local files; use --engine ray for a URI")
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise InputError("--out must differ from the input file")
    stats: dict = {}
    chunks = read_chunks(input_path, chunk_rows, stats)
    schema = output_schema(input_path) if out_fmt == "parquet" else None
    summary = Summary(blank_lines=0)
    writer = RowWriter(output_path, schema=schema, empty_columns=output_columns(input_path))
    t0 = time.perf_counter()
    try:
        with tqdm(total=count_rows(input_path), unit="row", desc="moderating",
                  disable=not show_progress) as bar:
            for rows in chunks:
                out = process_rows(rows, pipeline, query_col, answer_col, first_row=summary.rows)
                writer.write(out)
                summary.add(out)
                bar.update(len(rows))
                bar.set_postfix(flagged=summary.flagged, errors=summary.errors)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.blank_lines = stats.get("blank_lines", 0)
    summary.seconds = time.perf_counter() - t0
    return summary
