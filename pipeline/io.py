"""Streaming readers and writers for logs: JSONL, CSV and Parquet, chosen by file extension.

Readers yield lists of row dicts of at most ``chunk_rows`` rows, so a multi-GB log never sits in
memory whole. A JSONL line that is not valid JSON (or not an object) is yielded as a row holding
``raw`` (the line's text) and ``_error`` (why, with its line number), never dropped.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class InputError(Exception):
    """The input cannot be read at all (the batch job exits non-zero with this message)."""


def format_of(path: str | Path, role: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{role} {path}: unsupported extension {suffix!r}; "
                         f"expected one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def count_rows(path: str | Path) -> int | None:
    """Row count when it is cheap to know (Parquet metadata); None otherwise."""
    if format_of(path, "input") == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def read_chunks(path: str | Path, chunk_rows: int = 256) -> Iterator[list[dict]]:
    path = Path(path)
    fmt = format_of(path, "input")
    if not path.exists():
        raise InputError(f"input {path}: no such file")
    if fmt == "jsonl":
        return _read_jsonl(path, chunk_rows)
    if fmt == "csv":
        return _read_csv(path, chunk_rows)
    return _read_parquet(path, chunk_rows)


def _read_jsonl(path: Path, chunk_rows: int) -> Iterator[list[dict]]:
    rows: list[dict] = []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                row = {"raw": text, "_error": f"line {lineno}: not a valid JSON object ({msg})"}
            rows.append(row)
            if len(rows) >= chunk_rows:
                yield rows
                rows = []
    if rows:
        yield rows


def _read_csv(path: Path, chunk_rows: int) -> Iterator[list[dict]]:
    import pandas as pd

    try:
        # keep_default_na=False: an empty cell stays "" (reported as empty), "NA" stays text
        reader = pd.read_csv(path, chunksize=chunk_rows, dtype=str, keep_default_na=False,
                             on_bad_lines="error")
        for frame in reader:
            yield frame.to_dict(orient="records")
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"input {path}: cannot parse CSV ({e})") from None
    except pd.errors.EmptyDataError:
        return


def _read_parquet(path: Path, chunk_rows: int) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"input {path}: cannot read Parquet ({e})") from None
    for batch in pf.iter_batches(batch_size=chunk_rows):
        yield batch.to_pylist()


def _jsonable(v):
    """Values as JSON can hold them (NaN -> null, numpy/arrow scalars -> Python)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            pass
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


class RowWriter:
    """Writes rows in order to JSONL, CSV or Parquet. Parquet chunks go to temporary part files
    first and are unified into one schema at ``close`` (log rows may differ in their columns)."""

    def __init__(self, path: str | Path, schema_hint=None):
        """``schema_hint``: the input's Arrow schema, so Parquet output keeps the input's types."""
        self.path = Path(path)
        self.schema_hint = schema_hint
        self.fmt = format_of(self.path, "output")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._columns: list[str] | None = None
        self._parts: list[Path] = []
        self._closed = False
        if self.fmt == "parquet":
            self._dir = Path(tempfile.mkdtemp(prefix=".parts-", dir=self.path.parent))
        else:
            self._fh = self._tmp.open("w", encoding="utf-8", newline="")

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            for r in rows:
                self._fh.write(json.dumps({k: _jsonable(v) for k, v in r.items()},
                                          ensure_ascii=False, default=str) + "\n")
        elif self.fmt == "csv":
            self._write_csv(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            part = self._dir / f"part-{len(self._parts):06d}.parquet"
            table = pa.Table.from_pylist(rows)
            pq.write_table(table, part)
            self._parts.append(part)

    def _write_csv(self, rows: list[dict]) -> None:
        import csv

        if self._columns is None:
            cols: list[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            self._columns = cols
            self._csv = csv.DictWriter(self._fh, fieldnames=cols, extrasaction="raise")
            self._csv.writeheader()
        for r in rows:
            extra = [k for k in r if k not in self._columns]
            if extra:
                # CSV has one header: keep a late column's values rather than drop them
                r = {k: v for k, v in r.items() if k in self._columns}
                r["error"] = (r.get("error") or "") + f" [extra fields not in CSV header: {extra}]"
            out = {}
            for k in self._columns:
                v = _jsonable(r.get(k))
                out[k] = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
            self._csv.writerow(out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.fmt != "parquet":
            self._fh.close()
            os.replace(self._tmp, self.path)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schemas = [pq.read_schema(p) for p in self._parts]
            schema = _unified_schema(schemas) if schemas else pa.schema([])
            if self.schema_hint is not None:
                hint = {f.name: f.type for f in self.schema_hint}
                schema = pa.schema([(f.name, hint.get(f.name, f.type)) for f in schema])
            with pq.ParquetWriter(self._tmp, schema) as w:
                for p in self._parts:
                    t = pq.read_table(p)
                    for name in schema.names:
                        if name not in t.column_names:
                            t = t.append_column(name, pa.nulls(len(t), schema.field(name).type))
                    w.write_table(t.select(schema.names).cast(schema))
            os.replace(self._tmp, self.path)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        self._closed = True
        if self.fmt == "parquet":
            shutil.rmtree(self._dir, ignore_errors=True)
        else:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)


def _unified_schema(schemas):
    """Column order of first appearance; a column that is all-null in one part takes its type
    from the others; conflicting types fall back to string."""
    import pyarrow as pa

    names: list[str] = []
    types: dict[str, pa.DataType] = {}
    for s in schemas:
        for f in s:
            if f.name not in names:
                names.append(f.name)
            prev = types.get(f.name)
            if prev is None or pa.types.is_null(prev):
                types[f.name] = f.type
            elif not pa.types.is_null(f.type) and prev != f.type:
                numeric = all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in (prev, f.type))
                types[f.name] = pa.float64() if numeric else pa.string()
    return pa.schema([(n, types[n]) for n in names])
