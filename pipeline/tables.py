"""The one table reader and the validated pair model, for every part of the project.

The batch job, inspector/aligner training and evaluation, synth's query files and the experiments
read their files here, with the same formats and rules; each keeps only its own column needs.
Plain Python, pyarrow and (for ``read_table``) pandas: no torch, Ray or FastAPI.

Formats, by extension (case does not matter):

- ``.jsonl`` / ``.ndjson``: one JSON object per line;
- ``.json``: one JSON array of objects (``[{...}, {...}]``), read item by item, so its size does
  not matter; a file holding one object per line is JSON Lines and must be named ``.jsonl``;
- ``.csv`` (``.tsv``: tab-separated): a header line, then one record per line (a quoted field may
  span lines); every value is text (``""`` is empty, ``NA`` is the string NA); a repeated header
  name gets a suffix (``query``, ``query.1``);
- ``.parquet`` / ``.pq``: any schema, values keep their types;
- the text formats gzip-compressed: ``.jsonl.gz``, ``.json.gz``, ``.csv.gz``, ...

Text is UTF-8 (a BOM is skipped). Blank lines (JSONL, and CSV lines outside a quoted field) and an
empty file are no rows. Rows are numbered from 1, the first data row (a CSV header is no row).

A record that cannot be read -- a JSONL line that is not a JSON object (bad JSON, a list, nested
more than ``MAX_DEPTH`` levels), a ``.json`` item that is not an object, a CSV record with more or
fewer fields than the header, a line that is not UTF-8 -- is a row of its own in a stream
(``read_chunks``): ``{"raw": its text, "_error": "line N: why"}``, so the batch job keeps it as an
error row. Read strictly (``read_chunks(strict=True)``, ``read_table``: training data) it raises
``InputError`` naming the file and line. A file that cannot be read at all (missing, an unknown
extension, a CSV quote never closed, a ``.json`` array cut short, unreadable Parquet) raises
``InputError`` in both modes.

Field rules (``check_text``, ``extract_pair``, ``parse_label``): a text field is a non-empty string
of valid Unicode; a label is 0 or 1 (also ``"0"``/``"1"``, ``1.0``, ``true``/``false``). Consumers
report a bad one as ``FILE: row N: field 'x' ...``.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from inspector.model import check_unicode

csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long answers are fine in a CSV cell

#: extension -> format, for reading (a text format may also end in ``.gz``)
INPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                 ".parquet": "parquet", ".pq": "parquet"}
#: extension -> format, for the batch job's output
OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TEXT_FORMATS = ("jsonl", "json", "csv", "tsv")
#: a row nested deeper is an error row: Python's JSON parser and the writers recurse per level
MAX_DEPTH = 200
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what undecodable bytes become (errors="surrogateescape")


class InputError(ValueError):
    """A table cannot be read (the batch job exits 2 with this message; training stops)."""


class MissingInput(InputError, FileNotFoundError):
    """The file is not there (a ``FileNotFoundError`` too, for callers that catch that)."""


def is_uri(path) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: read through ``pyarrow.fs``, not the local disk."""
    return "://" in str(path)


def _suffixes(path) -> tuple[str, bool]:
    """(the format's extension, gzip-compressed?)"""
    name = Path(str(path)).name.lower()
    gz = name.endswith(".gz")
    return Path(name[:-3] if gz else name).suffix, gz


def format_of(path, role: str | None = None) -> str:
    """``jsonl``, ``json``, ``csv``, ``tsv`` or ``parquet`` for a file to read (``role="output"``:
    ``jsonl``, ``csv`` or ``parquet`` for one to write); InputError for anything else."""
    suffix, gz = _suffixes(path)
    if role == "output":
        table, fmt = OUTPUT_FORMATS, None if gz else OUTPUT_FORMATS.get(suffix)
    else:
        table, fmt = INPUT_FORMATS, INPUT_FORMATS.get(suffix)
        fmt = None if gz and fmt not in TEXT_FORMATS else fmt
    if fmt is None:
        shown = (suffix + (".gz" if gz else "")) or "(none)"
        allowed = ", ".join(table) + ("" if role == "output" else " (the text formats also .gz)")
        raise InputError(f"{role + ' ' if role else ''}{path}: unsupported format {shown!r}; expected one of {allowed}")
    return fmt


def _open_text(path: Path, gz: bool, newline: str | None = ""):
    """UTF-8 text (BOM skipped); undecodable bytes come through as lone surrogates, so the reader
    can make their record an error row instead of failing the file or changing the text."""
    raw = gzip.open(path, "rb") if gz else path.open("rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _shown_text(text: str) -> str:
    """A record's text as it can be written: undecodable bytes as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_utf8(text: str) -> str | None:
    m = _NOT_UTF8.search(text)
    return None if m is None else f"not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x}); save the file as UTF-8"


# ------------------------------------------------------------------------------------ metadata
def count_rows(path) -> int | None:
    """Row count when it is cheap to know (Parquet metadata); None otherwise."""
    if format_of(path) == "parquet" and not is_uri(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def input_schema(path):
    """A Parquet file's Arrow schema (a URI's through ``pyarrow.fs``); None for the text formats."""
    if format_of(path) != "parquet":
        return None
    import pyarrow.parquet as pq

    try:
        if is_uri(path):
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(str(path))
            return pq.read_schema(inner, filesystem=fs)
        return pq.read_schema(path)
    except Exception:  # noqa: BLE001 - unreadable input is reported by the reader, with its reason
        return None


def input_columns(path) -> list[str]:
    """The columns a CSV header or Parquet schema names (JSON rows name their own: []), so an
    input without rows still gives an output with its columns."""
    fmt = format_of(path)
    if fmt == "parquet":
        schema = input_schema(path)
        return list(schema.names) if schema is not None else []
    if fmt in ("csv", "tsv") and not is_uri(path):
        try:
            with _open_text(Path(path), _suffixes(path)[1]) as f:
                return _unique_names(next(csv.reader(f, delimiter=_DELIMITER[fmt]), []))
        except Exception:  # noqa: BLE001 - as above
            return []
    return []


# ------------------------------------------------------------------------------------ reading
def read_chunks(path, chunk_rows: int = 256, stats: dict | None = None,
                strict: bool = False) -> Iterator[list[dict]]:
    """The rows of a table, in order, in lists of at most ``chunk_rows`` (memory stays bounded).

    A record that cannot be read is an error row (``raw``, ``_error``); ``strict=True`` raises
    InputError naming the file and line instead. ``stats``, if given, gets ``blank_lines``: the
    blank lines skipped so far (JSONL, CSV)."""
    path = Path(path)
    fmt = format_of(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such file")
    stats = {} if stats is None else stats
    stats.setdefault("blank_lines", 0)
    if fmt == "parquet":
        chunks = _read_parquet(path, chunk_rows)
    else:
        readers = {"jsonl": _read_jsonl, "json": _read_json_array, "csv": _read_csv, "tsv": _read_csv}
        chunks = readers[fmt](path, _suffixes(path)[1], chunk_rows, stats, fmt)
    return _checked(chunks, path, strict)


def _checked(chunks: Iterator[list[dict]], path: Path, strict: bool) -> Iterator[list[dict]]:
    """An OS-level failure (a corrupt .gz, no permission) as InputError; ``strict``: an error row too."""
    try:
        for rows in chunks:
            if strict:
                for r in rows:
                    if "_error" in r:
                        raise InputError(f"{path}: {r['_error']}")
            yield rows
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_rows(path, strict: bool = True) -> Iterator[dict]:
    """One row at a time (strict by default: training data, query files)."""
    for rows in read_chunks(path, 1024, strict=strict):
        yield from rows


def read_table(path):
    """The whole table as a pandas DataFrame (training-sized data), read strictly: a record that
    cannot be read raises InputError naming the file and line."""
    import pandas as pd

    rows = list(read_rows(path))
    if not rows:
        return pd.DataFrame(columns=input_columns(path))
    return pd.DataFrame(rows)


def _error_row(text: str, why: str) -> dict:
    return {"raw": _shown_text(text), "_error": why}


def _parse_object(text: str) -> tuple[dict | None, str | None]:
    """(object, None), or (None, why the text is not a usable JSON object)."""
    bad = _not_utf8(text)
    if bad:
        return None, bad
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not a valid JSON object ({e.msg})"
    except RecursionError:  # nested too deeply for Python's parser
        return None, f"not a valid JSON object (nested more than {MAX_DEPTH} levels deep)"
    except ValueError as e:  # e.g. a number past Python's digit limit
        return None, f"not a valid JSON object ({e})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object per line, got {type(row).__name__}"
    if text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than(row, MAX_DEPTH):
        return None, f"not a valid JSON object (nested more than {MAX_DEPTH} levels deep)"
    return row, None


def _read_jsonl(path: Path, gz: bool, chunk_rows: int, stats: dict, fmt: str) -> Iterator[list[dict]]:
    rows: list[dict] = []
    with _open_text(path, gz, newline=None) as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if not text.strip():
                stats["blank_lines"] += 1
                continue
            row, why = _parse_object(text)
            rows.append(row if why is None else _error_row(text, f"line {lineno}: {why}"))
            if len(rows) >= chunk_rows:
                yield rows
                rows = []
    if rows:
        yield rows


_TOKEN = re.compile(r'[\[\]{},"]')
_STRING_END = re.compile(r'["\\]')
_SPACE = re.compile(r"[ \t\n\r]*")


def _item_end(buf: str, pos: int) -> int | None:
    """Where the array item starting at ``pos`` ends (the index of the ``,`` or ``]`` after it),
    found by brackets and quotes alone, so a broken item can be skipped; None: not in ``buf``."""
    depth, i = 0, pos
    while True:
        m = _TOKEN.search(buf, i)
        if m is None:
            return None
        c, i = m.group(), m.end()
        if c == '"':
            while True:
                m = _STRING_END.search(buf, i)
                if m is None:
                    return None
                i = m.end() + (1 if m.group() == "\\" else 0)
                if m.group() == '"':
                    break
            if i > len(buf):
                return None
        elif c in "[{":
            depth += 1
        elif c in "]}" and depth:
            depth -= 1
        elif depth == 0:  # "," or "]" outside the item
            return m.start()


def _read_json_array(path: Path, gz: bool, chunk_rows: int, stats: dict, fmt: str) -> Iterator[list[dict]]:
    """A JSON array of objects, item by item: a usable object is a row, any other item an error
    row (its text in ``raw``); a file that is not an array, or one cut short, is an InputError."""
    decoder = json.JSONDecoder()
    rows: list[dict] = []
    with _open_text(path, gz) as f:
        buf, pos, eof = "", 0, False
        line, counted = 1, 0  # the line number at buf[counted]

        def more(at_least: int = 1 << 16) -> bool:
            """Read on; ``buf`` then starts at ``pos`` (so ``pos`` is 0)."""
            nonlocal buf, pos, eof, counted
            if eof:
                return False
            data = f.read(max(at_least, 1 << 16))
            if not data:
                eof = True
                return False
            line_at(pos)
            buf, counted, pos = buf[pos:] + data, 0, 0
            return True

        def line_at(i: int) -> int:
            nonlocal line, counted
            line += buf.count("\n", counted, i)
            counted = i
            return line

        def skip_space() -> str:  # the next character ("" at the end of the file)
            nonlocal pos
            while True:
                pos = _SPACE.match(buf, pos).end()
                if pos < len(buf) or not more():
                    return buf[pos:pos + 1]

        first = skip_space()
        if first == "":
            return
        if first != "[":
            what = "one object" if first == "{" else "not an array"
            hint = "; a file with one object per line is JSON Lines: name it .jsonl" if first == "{" else ""
            raise InputError(f"{path}: line {line_at(pos)}: expected a JSON array of objects "
                             f"([{{...}}, ...]), found {what}{hint}")
        pos += 1
        item = 0
        while True:
            c = skip_space()
            if c == "]":
                pos += 1
                break
            if c == "":
                raise InputError(f"{path}: the JSON array is cut short (no closing ']')")
            item += 1
            while True:  # the item, read whole
                start, where = pos, line_at(pos)
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    why = None
                except json.JSONDecodeError as e:
                    value, why = None, f"not a valid JSON object ({e.msg})"
                except RecursionError:
                    value, why = None, f"not a valid JSON object (nested more than {MAX_DEPTH} levels deep)"
                except ValueError as e:
                    value, why = None, f"not a valid JSON object ({e})"
                if why is not None:
                    end = _item_end(buf, pos)
                if (end is None or end >= len(buf)) and more(len(buf)):
                    continue  # the item may go on past what is read so far
                break
            if end is None:
                raise InputError(f"{path}: line {where}: the JSON array is cut short (an item never ends: "
                                 f"a bracket or quote not closed)")
            text = buf[start:end]
            if why is None:
                bad = _not_utf8(text)
                if bad:
                    why = bad
                elif not isinstance(value, dict):
                    why = f"expected a JSON object, got {type(value).__name__}"
                elif text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
                    why = f"not a valid JSON object (nested more than {MAX_DEPTH} levels deep)"
            rows.append(value if why is None else _error_row(text.strip(), f"line {where}, item {item}: {why}"))
            if len(rows) >= chunk_rows:
                yield rows
                rows = []
            pos = end
            c = skip_space()
            if c == ",":
                pos += 1
            elif c == "":
                raise InputError(f"{path}: the JSON array is cut short (no closing ']')")
            elif c != "]":
                raise InputError(f"{path}: line {line_at(pos)}: expected ',' or ']' after item {item} of the "
                                 f"JSON array, found {c!r}")
        if skip_space() != "":
            raise InputError(f"{path}: line {line_at(pos)}: more text after the JSON array's closing ']'")
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


_DELIMITER = {"csv": ",", "tsv": "\t"}


def _read_csv(path: Path, gz: bool, chunk_rows: int, stats: dict, fmt: str) -> Iterator[list[dict]]:
    """Every value stays text. A record whose field count differs from the header's (an unquoted
    comma, a cut-off line) is an error row with its text in ``raw``; only a file the CSV reader
    cannot tokenise at all (e.g. a quote never closed) is an InputError."""
    delimiter = _DELIMITER[fmt]
    with _open_text(path, gz) as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        rows: list[dict] = []
        try:
            header = next(reader, None)
            if header is None:
                return
            bad = _not_utf8("".join(header))
            if bad:
                raise InputError(f"{path}: line 1 (the header): {bad}")
            header = _unique_names(header)
            line = reader.line_num + 1  # where the next record starts
            for record in reader:
                if not record:  # a blank line
                    stats["blank_lines"] += 1
                elif len(record) != len(header) or _NOT_UTF8.search("".join(record)):
                    text = io.StringIO()
                    csv.writer(text, delimiter=delimiter, lineterminator="").writerow(record)
                    if len(record) == len(header):
                        why = _not_utf8("".join(record))
                    else:
                        sep = "tabs" if fmt == "tsv" else "commas"
                        hint = f"quote fields that contain {sep}" if len(record) > len(header) else "a line cut short?"
                        why = (f"{len(record)} fields, but the header has {len(header)} "
                               f"({', '.join(header)}); {hint}")
                    rows.append(_error_row(text.getvalue(), f"line {line}: {why}"))
                else:
                    rows.append(dict(zip(header, record)))
                line = reader.line_num + 1
                if len(rows) >= chunk_rows:
                    yield rows
                    rows = []
        except csv.Error as e:
            raise InputError(f"{path}: cannot parse CSV at line {reader.line_num} ({e})") from None
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
        for batch in pf.iter_batches(batch_size=chunk_rows):
            yield batch.to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read Parquet ({e})") from None


# ------------------------------------------------------------------------------------ fields
def is_missing(value) -> bool:
    """No value: None, or a float NaN (how pandas fills a cell a row does not have)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def present(row: dict) -> dict:
    """A DataFrame record without its missing cells, so a missing field reads as missing."""
    return {k: v for k, v in row.items() if not is_missing(v)}


def shown(value) -> str:
    """A cell as an error message shows it: 7 (a number, or the CSV text "7"), 'abc', None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, dict)):
        try:
            value = value.item()  # numpy scalars: 7, not np.int64(7)
        except (ValueError, AttributeError):
            pass
    if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value.strip()):
        return value.strip()
    return repr(value)


def check_text(value, name: str, missing_hint: str = "") -> str:
    """``value`` if it is a non-empty string of valid Unicode, else ValueError naming the field."""
    if value is None:
        raise ValueError(f"field {name!r} is missing; expected a non-empty string{missing_hint}")
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    check_unicode(value, f"field {name!r}")
    return value


_TRUE, _FALSE = ("1", "1.0", "true"), ("0", "0.0", "false")


def parse_label(value) -> int:
    """0 or 1 from ``0``/``1``, ``0.0``/``1.0``, ``False``/``True`` or their text; ValueError otherwise."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return int(value.strip().lower() in _TRUE)
    raise ValueError(f"not a 0/1 label: {value!r}")


def require_columns(columns: Iterable[str], need: Iterable[str], where, hint: str = "") -> None:
    """InputError naming the missing columns and those found."""
    columns = list(columns)
    missing = [c for c in need if c not in columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; found {columns}" + (f" ({hint})" if hint else ""))


class Pair(NamedTuple):
    """One validated (query, answer): non-empty strings of valid Unicode."""

    query: str
    answer: str


def extract_pair(row: dict, query_col: str = "query", answer_col: str = "answer",
                 messages_col: str = "messages") -> Pair:
    """The pair a row holds: in two columns, or as a chat transcript in ``messages_col`` (a list of
    ``{role, content}``, or its JSON text: the last user turn is the query, the last assistant turn
    the answer). ValueError naming the field and what was expected."""
    messages = row.get(messages_col)
    # a blank cell is no value: a CSV with query, answer and messages columns leaves one side empty
    has_columns = any(v is not None and not (isinstance(v, str) and not v.strip())
                      for v in (row.get(query_col), row.get(answer_col)))
    if has_columns or messages is None or (isinstance(messages, str) and not messages.strip()):
        hint = f" (or a {messages_col!r} list of {{role, content}})"
        return Pair(check_text(row.get(query_col), query_col, hint), check_text(row.get(answer_col), answer_col, hint))
    return _pair_from_messages(messages, messages_col)


def _pair_from_messages(messages, col: str) -> Pair:
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
    return Pair(last["user"][1], last["assistant"][1])
