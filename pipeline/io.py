"""Writers for the batch job's output: JSONL, CSV and Parquet, chosen by file extension (the
readers are ``pipeline.tables``, the one reader every part of the project uses).

Rows are written as they come, in order, so memory stays bounded. Parquet output is one file
written by one ``pyarrow.parquet.ParquetWriter`` whose schema is settled before the first row:
given by the caller (``pipeline.jobs.output_schema``: the input's own types and the annotation
columns'), else taken from the first chunk. Rows are buffered into row groups of up to
``ROW_GROUP_ROWS`` rows (or ``ROW_GROUP_BYTES``), never re-read. A column of text type takes any
value (a non-string as its text: JSON for objects and lists); a value that fits no column of the
schema is a ``ValueError`` (a caller that settled the schema from the whole input never sees one).

Writers write to a hidden temporary file beside the output (``.NAME.HOST.PID.TOKEN.partial``) and
move it over the output when done. A killed run leaves it behind: the next ``RowWriter`` for the
same output removes those whose process is gone (same host, PID no longer running), and keeps
those of a job still running or started on another host (whose PID cannot be checked from here).
``.NAME.partial`` files and ``.NAME.HOST.PID.TOKEN.parts`` part folders left by earlier versions
are removed too; anything else is never touched.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from .tables import format_of

#: Parquet row groups: at most this many rows, or about this many bytes of Arrow data
ROW_GROUP_ROWS = 65_536
ROW_GROUP_BYTES = 64 << 20
#: Arrow's Parquet reader refuses a schema nested more than 100 levels (a list is two of them)
PARQUET_MAX_NESTING = 90


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
    """Writes rows in order to JSONL, CSV or Parquet (one streaming ``ParquetWriter``)."""

    def __init__(self, path: str | Path, schema=None, empty_columns: list[str] | None = None):
        """``schema``: the Parquet output's Arrow schema, settled up front (None: from the first
        chunk); ``empty_columns``: the CSV header to write if no row ever comes."""
        self.path = Path(path)
        self.schema = schema
        self.empty_columns = list(empty_columns or [])
        self.fmt = format_of(self.path, "output")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        stem = f".{self.path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"
        self._tmp = self.path.with_name(stem + ".partial")
        self._columns: list[str] | None = None
        self._header_width: int | None = None  # CSV: columns named in the header written so far
        self._closed = False
        self._pq = None  # the ParquetWriter, opened with the schema
        self._pending: list = []  # Parquet: tables not yet written as a row group
        self._pending_rows = self._pending_bytes = 0
        if self.fmt != "parquet":
            # a lone surrogate (from a JSON escape like \\ud800) is written as that escape's text
            self._fh = self._tmp.open("w", encoding="utf-8", errors="backslashreplace", newline="")
        elif schema is not None:
            self._open_parquet(schema)

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            for r in rows:
                self._fh.write(_json_line({k: _jsonable(v) for k, v in r.items()}) + "\n")
        elif self.fmt == "csv":
            self._write_csv(rows)
        else:
            self._write_parquet(rows)

    # -- Parquet
    def _open_parquet(self, schema) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self._pq = pq.ParquetWriter(self._tmp, schema)

    def _write_parquet(self, rows: list[dict]) -> None:
        import pyarrow as pa

        if self._pq is None:
            self._open_parquet(schema_of_rows(rows))
        names = set(self.schema.names)
        for r in rows:
            for k in r:
                if k not in names:
                    raise ValueError(f"{self.path}: field {k!r} is not in the Parquet output's schema "
                                     f"({', '.join(self.schema.names)}), settled before the first row")
        arrays = [_column([r.get(f.name) for r in rows], f) for f in self.schema]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += sum(a.nbytes for a in arrays)
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            table = pa.concat_tables(self._pending)
            self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
            self._pq.write_table(table, row_group_size=max(1, table.num_rows))

    # -- CSV
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
        try:
            if self.fmt == "parquet":
                if self._pq is None:  # no rows, no schema given: the columns as text
                    import pyarrow as pa

                    self._open_parquet(pa.schema([(c, pa.string()) for c in self.empty_columns]))
                self._flush()
                self._pq.close()
            else:
                if self.fmt == "csv" and self._columns is None and self.empty_columns:
                    csv.writer(self._fh).writerow(self.empty_columns)  # no rows: still the columns
                self._fh.close()
                if self._columns and len(self._columns) > self._header_width:
                    self._widen_csv_header()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._closed = True
        try:
            if self._pq is not None:
                self._pq.close()
            elif self.fmt != "parquet":
                self._fh.close()
        except Exception:  # noqa: BLE001 - the temporary goes either way
            pass
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




# ------------------------------------------------------------------------------------ Parquet types
def _text_type(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _column(values: list, field):
    """One column of a row group: a text column takes any value (a non-string as its text)."""
    import pyarrow as pa

    if _text_type(field.type):
        values = [_as_text(_jsonable(v)) for v in values]
    try:
        return pa.array(values, type=field.type)
    except UnicodeEncodeError:  # Arrow strings are UTF-8: lone surrogates as their escape's text
        return pa.array(_utf8_safe(values), type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
        raise ValueError(f"column {field.name!r}: a value does not fit its Parquet type {field.type} ({e})") from None


def value_type(values: list):
    """The Arrow type of a column's values (Python, as JSON gives them): text when they mix types
    (``1`` here, ``"abc"`` there), nest too deeply for Parquet, or are all null."""
    import pyarrow as pa

    try:
        try:
            t = pa.array(values).type
        except UnicodeEncodeError:
            t = pa.array(_utf8_safe(values)).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return pa.string()
    return pa.null() if pa.types.is_null(t) else t if _parquet_nesting(t) <= PARQUET_MAX_NESTING else pa.string()


def unify_types(a, b):
    """One type for a column whose chunks have types ``a`` and ``b`` (None: not seen yet): nulls
    take the other's type, numbers widen to float64, objects merge their fields; else text."""
    import pyarrow as pa

    if a is None or a == b:
        return b
    try:
        t = pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])],
                             promote_options="permissive").field("x").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.string()
    return t if _parquet_nesting(t) <= PARQUET_MAX_NESTING else pa.string()


def settled(t):
    """A type Parquet columns can take for good: null (in nested types too) becomes text."""
    import pyarrow as pa

    if pa.types.is_null(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(settled(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(settled(t.field(i).type)) for i in range(t.num_fields)])
    return t


def schema_of_rows(rows: list[dict]):
    """A schema from rows alone (when the caller settled none): their columns, each column's type."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.schema([(n, settled(value_type([r.get(n) for r in rows]))) for n in names])


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
