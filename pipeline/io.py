"""Streaming readers and writers for logs: JSONL, CSV and Parquet, chosen by file extension.

Readers yield lists of row dicts of at most ``chunk_rows`` rows, so a multi-GB log never sits in
memory whole. A JSONL line that cannot be read as a JSON object (not JSON, not an object, a number
past Python's digit limit, nested more than ``MAX_DEPTH`` levels) is yielded as a row holding
``raw`` (the line's text) and ``_error`` (why, with its line number), never dropped. Blank lines
(JSONL, and CSV lines outside a quoted field) are no rows; ``read_chunks`` counts them in ``stats``.

Writers write to hidden temporary files beside the output (``.NAME.HOST.PID.TOKEN.partial``, and
for Parquet a ``.NAME.HOST.PID.TOKEN.parts`` folder) and move the result over the output when done.
A killed run leaves them behind: the next ``RowWriter`` for the same output removes those whose
process is gone (same host, PID no longer running), and keeps those of a job still running or
started on another host (whose PID cannot be checked from here). ``.NAME.partial`` files left by
versions before the PID was in the name are removed too; anything else is never touched.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long answers are fine in a CSV cell

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: a JSONL row nested deeper is an error row: Python's JSON parser and the writers recurse per level
MAX_DEPTH = 200


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


def read_chunks(path: str | Path, chunk_rows: int = 256, stats: dict | None = None) -> Iterator[list[dict]]:
    """``stats``, if given, gets ``blank_lines``: the blank lines skipped so far (JSONL, CSV)."""
    path = Path(path)
    fmt = format_of(path, "input")
    if not path.exists():
        raise InputError(f"input {path}: no such file")
    stats = {} if stats is None else stats
    stats.setdefault("blank_lines", 0)
    if fmt == "jsonl":
        return _read_jsonl(path, chunk_rows, stats)
    if fmt == "csv":
        return _read_csv(path, chunk_rows, stats)
    return _read_parquet(path, chunk_rows)


def _read_jsonl(path: Path, chunk_rows: int, stats: dict) -> Iterator[list[dict]]:
    rows: list[dict] = []
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM is not row 1's text
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip():
                stats["blank_lines"] += 1
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                if text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than(row, MAX_DEPTH):
                    raise RecursionError  # parsed, but too deep for the writers (they recurse too)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply to parse
                msg = (e.msg if isinstance(e, json.JSONDecodeError) else str(e) if isinstance(e, ValueError)
                       else f"nested more than {MAX_DEPTH} levels deep")
                row = {"raw": text, "_error": f"line {lineno}: not a valid JSON object ({msg})"}
            rows.append(row)
            if len(rows) >= chunk_rows:
                yield rows
                rows = []
    if rows:
        yield rows


def _deeper_than(value, limit: int) -> bool:
    """Whether lists/dicts nest more than ``limit`` levels in ``value`` (iterative: no recursion)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth >= limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _read_csv(path: Path, chunk_rows: int, stats: dict) -> Iterator[list[dict]]:
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
                else:
                    stats["blank_lines"] += 1
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
    """Values as JSON can hold them (NaN and +-infinity -> null, numpy/arrow scalars -> Python)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            pass
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")  # no dots: the name splits on them


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs, as another user; no such PID: keep
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files and part folders that killed runs left for output ``path``
    (see the module docstring for what counts as stale); returns what was removed."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return []
    ours = re.compile(re.escape(f".{path.name}.") + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d{1,10})\.[0-9a-f]{8}"
                      r"(?:\.partial(?:\.wide)?|\.parts)")
    legacy = {f".{path.name}.partial", f".{path.name}.partial.wide"}  # before the PID was in the name
    removed = []
    for p in folder.iterdir():
        m = ours.fullmatch(p.name)
        if m is None and p.name not in legacy:
            continue
        if m is not None and (m["host"] != _HOST or _pid_running(int(m["pid"]))):
            continue  # a job still running (or one on another host, which cannot be checked)
        if p.is_dir() and not p.is_symlink():
            if any(not (c.is_file() and re.fullmatch(r"part-\d{6}\.parquet", c.name)) for c in p.iterdir()):
                continue  # not only our part files: not ours to delete
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


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
        remove_stale_temporaries(self.path)
        stem = f".{self.path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"
        self._tmp = self.path.with_name(stem + ".partial")
        self._columns: list[str] | None = None
        self._header_width: int | None = None  # CSV: columns named in the header written so far
        self._parts: list[Path] = []
        self._closed = False
        if self.fmt == "parquet":
            self._dir = self.path.with_name(stem + ".parts")
            self._dir.mkdir()
        else:
            # a lone surrogate (from a JSON escape like \\ud800) is written as that escape's text
            self._fh = self._tmp.open("w", encoding="utf-8", errors="backslashreplace", newline="")

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            for r in rows:
                self._fh.write(_json_line({k: _jsonable(v) for k, v in r.items()}) + "\n")
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
            pq.write_table(_deep_columns_as_text(table), part)
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


def _finite(v):
    """``v`` with every non-finite float inside lists and dicts as None (JSON has no NaN/Infinity)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def _json_line(v) -> str:
    """Strict JSON text (a NaN or 1e999 nested in a log's field is written as null, not as the
    ``NaN``/``Infinity`` that JSON parsers refuse)."""
    try:
        return json.dumps(v, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(v), ensure_ascii=False, default=str, allow_nan=False)


def _as_text(v):
    if v is None or isinstance(v, str):
        return v
    return _json_line(_jsonable(v)) if isinstance(v, (list, dict)) else str(v)


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


#: Arrow's Parquet reader refuses a schema nested more than 100 levels (a list is two of them)
PARQUET_MAX_NESTING = 90


def _parquet_nesting(t) -> int:
    """Parquet schema levels an Arrow type takes (a list: 2, a struct: 1, a map: 2, a leaf: 0)."""
    import pyarrow as pa

    if pa.types.is_map(t):
        return 2 + max(_parquet_nesting(t.key_type), _parquet_nesting(t.item_type))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return 2 + _parquet_nesting(t.value_type)
    if pa.types.is_struct(t):
        return 1 + max((_parquet_nesting(t.field(i).type) for i in range(t.num_fields)), default=0)
    return 0


def _deep_columns_as_text(table):
    """A column nested too deeply for Parquet to read back is written as its JSON text."""
    import pyarrow as pa

    for i, name in enumerate(table.column_names):
        if _parquet_nesting(table.schema.field(i).type) > PARQUET_MAX_NESTING:
            text = pa.array([_as_text(v) for v in table.column(i).to_pylist()], type=pa.string())
            table = table.set_column(i, name, text)
    return table


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
