"""Streaming readers and writers for logs: JSONL, CSV and Parquet, chosen by file extension.

Readers yield lists of row dicts of at most ``chunk_rows`` rows, so a multi-GB log never sits in
memory whole. A JSONL line that is not valid JSON (or not an object) is yielded as a row holding
``raw`` (the line's text) and ``_error`` (why, with its line number), never dropped.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long answers are fine in a CSV cell

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class InputError(Exception):
    """The input cannot be read at all (the batch job exits non-zero with this message)."""


def is_uri(path) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: read through ``pyarrow.fs``, not the local disk."""
    return "://" in str(path)


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


def input_columns(path: str | Path) -> list[str]:
    """The columns a CSV header or Parquet schema names (JSONL rows name their own: []), so an
    input without rows still gives an output with its columns."""
    fmt = format_of(path, "input")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if fmt == "csv":
            with Path(path).open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
                return _unique_names(next(csv.reader(f), []))
    except Exception:  # noqa: BLE001 - unreadable input is reported by the reader, with its reason
        return []
    return []


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
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM is not row 1's text
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
    """Every value stays text ("" is empty, "NA" is the string NA). A record whose field count
    differs from the header's (an unquoted comma, a cut-off line) becomes an error row with its
    text in ``raw``, like a bad JSONL line; only a file the CSV reader cannot tokenise at all
    (e.g. a quote never closed) is an input error."""
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = _unique_names(header)
            rows: list[dict] = []
            line = reader.line_num + 1  # where the next record starts
            for record in reader:
                if record and len(record) == len(header):
                    rows.append(dict(zip(header, record)))
                elif record:  # [] is a blank line
                    text = io.StringIO()
                    csv.writer(text, lineterminator="").writerow(record)
                    hint = "quote fields that contain commas" if len(record) > len(header) else "a line cut short?"
                    rows.append({"raw": text.getvalue(), "_error": (
                        f"line {line}: expected {len(header)} CSV fields ({', '.join(header)}), "
                        f"got {len(record)} ({hint})")})
                line = reader.line_num + 1
                if len(rows) >= chunk_rows:
                    yield rows
                    rows = []
        except csv.Error as e:
            raise InputError(f"input {path}: cannot parse CSV at line {reader.line_num} ({e})") from None
    if rows:
        yield rows


def _unique_names(header: list[str]) -> list[str]:
    """A repeated CSV column name gets a suffix (``query``, ``query.1``) so no column's values are lost."""
    seen: dict[str, int] = {}
    out = []
    for name in header:
        new = name
        while new in seen:
            seen[name] += 1
            new = f"{name}.{seen[name]}"
        seen.setdefault(new, 0)
        out.append(new)
    return out


def _read_parquet(path: Path, chunk_rows: int) -> Iterator[list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"input {path}: cannot read Parquet ({e})") from None
    for batch in pf.iter_batches(batch_size=chunk_rows):
        yield batch.to_pylist()


def _utf8_safe(v):
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, list):
        return [_utf8_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: _utf8_safe(x) for k, x in v.items()}
    return v


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

    def __init__(self, path: str | Path, schema_hint=None, empty_columns: list[str] | None = None):
        """``schema_hint``: the input's Arrow schema, so Parquet output keeps the input's types;
        ``empty_columns``: the header (CSV) or schema (Parquet) to write if no row ever comes."""
        self.path = Path(path)
        self.schema_hint = schema_hint
        self.empty_columns = list(empty_columns or [])
        self.fmt = format_of(self.path, "output")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._columns: list[str] | None = None
        self._header_width: int | None = None  # CSV: columns named in the header written so far
        self._parts: list[Path] = []
        self._closed = False
        if self.fmt == "parquet":
            self._dir = Path(tempfile.mkdtemp(prefix=".parts-", dir=self.path.parent))
        else:
            # a lone surrogate (from a JSON escape like \\ud800) is written as that escape's text
            self._fh = self._tmp.open("w", encoding="utf-8", errors="backslashreplace", newline="")

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
            try:
                table = pa.Table.from_pylist(rows)
            except UnicodeEncodeError:  # Arrow strings are UTF-8: lone surrogates as escape text
                rows = [{k: _utf8_safe(v) for k, v in r.items()} for r in rows]
                table = _table_mixed_as_text(rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                table = _table_mixed_as_text(rows)  # a field that is 1 in one row and "abc" in another
            pq.write_table(table, part)
            self._parts.append(part)

    def _write_csv(self, rows: list[dict]) -> None:
        """CSV has one header, written before later rows are seen: a column that first appears in
        a later chunk (a bad line's ``raw``, a field only some log rows have) is appended to the
        column list, and ``close`` rewrites the header, padding the earlier rows; no value is dropped."""
        if self._columns is None:
            self._columns = []
            self._csv = csv.writer(self._fh)
        for r in rows:
            self._columns += [k for k in r if k not in self._columns]
        if self._header_width is None:
            self._csv.writerow(self._columns)
            self._header_width = len(self._columns)
        for r in rows:
            self._csv.writerow([_as_text(_jsonable(r.get(k))) for k in self._columns])

    def _widen_csv_header(self) -> None:
        """Second streaming pass over the written CSV: the full header, short rows padded."""
        wide = self._tmp.with_name(self._tmp.name + ".wide")
        with self._tmp.open("r", encoding="utf-8", newline="") as src, \
                wide.open("w", encoding="utf-8", newline="") as dst:
            reader, writer = csv.reader(src), csv.writer(dst)
            next(reader)
            writer.writerow(self._columns)
            for record in reader:
                writer.writerow(record + [""] * (len(self._columns) - len(record)))
        os.replace(wide, self._tmp)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.fmt == "csv" and self._columns is None and self.empty_columns:
            csv.writer(self._fh).writerow(self.empty_columns)  # no rows: still the columns
        if self.fmt != "parquet":
            self._fh.close()
            if self._columns and len(self._columns) > self._header_width:
                self._widen_csv_header()
            os.replace(self._tmp, self.path)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schemas = [pq.read_schema(p) for p in self._parts]
            hint = {f.name: f.type for f in self.schema_hint} if self.schema_hint is not None else {}
            schema = _unified_schema(schemas) if schemas else \
                pa.schema([(n, hint.get(n, pa.string())) for n in self.empty_columns])
            # each column keeps the input's type, else the parts' common type, as long as every
            # part casts to it; otherwise it is written as text (types only step down: this ends)
            types = {f.name: hint.get(f.name, f.type) for f in schema}
            changed = True
            while changed:
                changed = False
                for p in self._parts:
                    t = pq.read_table(p)
                    for name in t.column_names:
                        col, common = t.column(name), schema.field(name).type
                        if pa.types.is_string(types[name]) or _casts(col, types[name]):
                            continue
                        types[name] = common if common != types[name] and _casts(col, common) else pa.string()
                        changed = True
            schema = pa.schema([(n, types[n]) for n in schema.names])
            with pq.ParquetWriter(self._tmp, schema) as w:
                for p in self._parts:
                    t = pq.read_table(p)
                    cols = [_cast_or_text(t.column(n), f.type) if n in t.column_names else pa.nulls(len(t), f.type)
                            for n, f in zip(schema.names, schema)]
                    w.write_table(pa.Table.from_arrays(cols, schema=schema))
            os.replace(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        self._closed = True
        if self.fmt == "parquet":
            shutil.rmtree(self._dir, ignore_errors=True)
        else:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)
            self._tmp.with_name(self._tmp.name + ".wide").unlink(missing_ok=True)


def _as_text(v):
    if v is None or isinstance(v, str):
        return v
    return json.dumps(_jsonable(v), ensure_ascii=False, default=str) if isinstance(v, (list, dict)) else str(v)


def _table_mixed_as_text(rows: list[dict]):
    """Arrow table of rows whose fields may change type from row to row: such a column is text."""
    import pyarrow as pa

    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    arrays = []
    for n in names:
        values = [r.get(n) for r in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            arrays.append(pa.array([_as_text(v) for v in values], type=pa.string()))
    return pa.Table.from_arrays(arrays, names=names)


def _casts(column, target) -> bool:
    import pyarrow as pa

    try:
        column.cast(target)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False


def _cast_or_text(column, target):
    import pyarrow as pa

    if _casts(column, target):
        return column.cast(target)
    return pa.array([_as_text(v) for v in column.to_pylist()], type=pa.string())


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
