"""``python -m pipeline.batch``: every row out, in order, with its columns; bad rows get errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import EXAMPLES, REPO_ROOT
from inspector import Inspector
from pipeline.batch import run_batch
from pipeline.core import ModerationPipeline
from pipeline.routing import PipelineConfig, route
from pipeline.tables import InputError, extract_pair

LOGS = EXAMPLES / "chat_logs.jsonl"
ADDED = ["inspector_score", "flagged", "corrected_answer", "corrected_score", "fallback", "reason", "error"]


@pytest.fixture(scope="module")
def inspector():
    return Inspector.load()


@pytest.fixture(scope="module")
def pipeline(inspector):
    return ModerationPipeline(inspector)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_example_logs_round_trip_in_order(pipeline, tmp_path):
    out = tmp_path / "scored.jsonl"
    summary = run_batch(LOGS, out, pipeline, show_progress=False)
    rows_in, rows_out = read_jsonl(LOGS), read_jsonl(out)
    assert len(rows_out) == len(rows_in) == summary.rows
    for a, b in zip(rows_in, rows_out):
        assert {k: b[k] for k in a} == a  # every input column kept, unchanged, in order
        for col in ADDED:
            assert col in b
        assert b["error"] is None
        assert isinstance(b["inspector_score"], float) and 0 <= b["inspector_score"] <= 1
        assert b["flagged"] == (b["inspector_score"] >= pipeline.threshold)
    assert summary.errors == 0 and summary.scored == len(rows_in)
    assert 0 < summary.flagged < len(rows_in)
    # without an aligner, fail_open keeps the answer and says so, and why
    for b in rows_out:
        assert b["corrected_answer"] is None
        assert b["fallback"] == ("fail_open" if b["flagged"] else None)
        assert b["reason"] == ("no_aligner" if b["flagged"] else None)
    assert summary.to_dict()["fallback_reasons"] == {"no_aligner": summary.flagged}


def test_chunking_does_not_change_results(pipeline, tmp_path):
    run_batch(LOGS, tmp_path / "a.jsonl", pipeline, chunk_rows=256, show_progress=False)
    run_batch(LOGS, tmp_path / "b.jsonl", pipeline, chunk_rows=5, show_progress=False)
    a, b = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert [r["conversation_id"] for r in a] == [r["conversation_id"] for r in b]
    np.testing.assert_allclose([r["inspector_score"] for r in a], [r["inspector_score"] for r in b], atol=1e-6)


def test_bad_rows_become_error_rows(pipeline, tmp_path):
    src = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"id": 1, "query": "What is 2+2?", "answer": "4."}),
        '{"id": 2, "query": "broken json", "answer": ',
        json.dumps({"id": 3, "query": "Hi", "answer": ""}),
        json.dumps({"id": 4, "query": "Hi", "answer": 42}),
        json.dumps({"id": 5, "query": "Hi"}),
        "[1, 2, 3]",
        json.dumps({"id": 7, "messages": [{"role": "user", "content": "Hi"}]}),
        json.dumps({"id": 8, "query": "Name a colour.", "answer": "Blue."}),
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    summary = run_batch(src, out, pipeline, chunk_rows=3, show_progress=False)
    rows = read_jsonl(out)
    assert len(rows) == 8 and summary.errors == 6 and summary.scored == 2
    assert rows[0]["error"] is None and rows[7]["error"] is None and rows[7]["id"] == 8
    assert "line 2" in rows[1]["error"] and rows[1]["raw"] == lines[1]
    assert "'answer' is empty" in rows[2]["error"]
    assert "'answer' must be a string, got int" in rows[3]["error"]
    assert "'answer' is missing" in rows[4]["error"]
    assert "line 6" in rows[5]["error"] and "JSON object" in rows[5]["error"]
    assert "assistant" in rows[6]["error"]
    for r in rows[1:7]:
        assert r["inspector_score"] is None and r["flagged"] is None


def test_invalid_unicode_fails_its_row_not_the_chunk(pipeline, tmp_path):
    """A JSON escape like \\ud800 parses into a lone surrogate the tokenizer cannot take: that row
    gets an error; the rest of its chunk is still scored."""
    src = tmp_path / "logs.jsonl"
    src.write_text('{"query": "Hi", "answer": "Hello."}\n'
                   '{"query": "Hi", "answer": "bad \\ud800 text"}\n'
                   '{"messages": [{"role": "user", "content": "Hi \\udfff"}, {"role": "assistant", "content": "Yo"}]}\n'
                   '{"query": "Bye", "answer": "Goodbye."}\n')
    for name in ("out.jsonl", "out.csv", "out.parquet"):  # and every output format can hold the row
        summary = run_batch(src, tmp_path / name, pipeline, show_progress=False)
        assert summary.scored == 2 and summary.errors == 2, name
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows[0]["error"] is None and rows[3]["error"] is None and rows[3]["inspector_score"] is not None
    assert "row 2: field 'answer' is not valid Unicode text" in rows[1]["error"]
    assert "row 3: messages[0] (user) content is not valid Unicode text" in rows[2]["error"]
    assert rows[1]["answer"] == "bad \ud800 text"  # written as the escape it came in as: round-trips
    assert pd.read_csv(tmp_path / "out.csv")["answer"][1] == "bad \\ud800 text"
    assert pd.read_parquet(tmp_path / "out.parquet")["answer"][1] == "bad \\ud800 text"


def test_deeply_nested_lines_become_error_rows(pipeline, tmp_path):
    """A line nested 5,000 deep makes Python's JSON parser raise RecursionError (not ValueError);
    one that parses but nests deeper than the writers can recurse would fail at writing. Each is
    its line's error row; the job goes on and writes every format."""
    deep = "[" * 5000 + "]" * 5000
    lines = [json.dumps({"id": 1, "query": "What is 2+2?", "answer": "4."}),
             deep,
             '{"query": ' + deep + ', "answer": "a"}',
             '{"query": "Hi", "answer": "Hello.", "meta": ' + "[" * 900 + "]" * 900 + "}",
             '{"query": "Hi", "answer": "Hello.", "meta": ' + "[" * 150 + "]" * 150 + "}",  # deep but fine
             json.dumps({"id": 6, "query": "Name a colour.", "answer": "Blue."})]
    src = tmp_path / "deep.jsonl"
    src.write_text("\n".join(lines) + "\n")
    for name in ("out.jsonl", "out.csv", "out.parquet"):
        summary = run_batch(src, tmp_path / name, pipeline, chunk_rows=2, show_progress=False)
        assert summary.rows == 6 and summary.errors == 3 and summary.scored == 3, name
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r.get("id") for r in rows] == [1, None, None, None, None, 6]
    for r, n in zip(rows[1:4], (2, 3, 4)):
        assert r["error"].startswith(f"line {n}: not a valid JSON object (nested more than ")
        assert r["raw"] == lines[n - 1] and r["inspector_score"] is None
    assert rows[4]["error"] is None and rows[4]["inspector_score"] is not None
    assert pd.read_csv(tmp_path / "out.csv")["error"].notna().sum() == 3
    df = pd.read_parquet(tmp_path / "out.parquet")  # too deep for a Parquet column: kept as its JSON text
    assert df["error"].notna().sum() == 3 and df["meta"][4] == "[" * 150 + "]" * 150
    assert list(df["raw"].notna()) == [False, True, True, True, False, False]


def test_blank_lines_are_counted_in_the_printed_summary(tmp_path, capsys):
    from pipeline.batch import main

    src = tmp_path / "logs.jsonl"
    src.write_text("\n" + json.dumps({"query": "Hi", "answer": "Hello."}) + "\n   \n\r\n"
                   + json.dumps({"query": "Bye", "answer": "Goodbye."}) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert main([str(src), "--out", str(out), "--aligner", "none", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["rows"] == 2 and summary["blank_lines"] == 4 and summary["errors"] == 0
    assert len(read_jsonl(out)) == 2
    csv_in = tmp_path / "logs.csv"
    csv_in.write_text('query,answer\nHi,Hello.\n\n"Multi\n\nline",Yes\n\n')  # blank lines in quotes are text
    out_csv = tmp_path / "out_csv.jsonl"
    assert main([str(csv_in), "--out", str(out_csv), "--aligner", "none", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["rows"] == 2 and summary["blank_lines"] == 2
    assert read_jsonl(out_csv)[1]["query"] == "Multi\n\nline"


def test_infinite_numbers_are_treated_like_nan(pipeline, tmp_path):
    """1e999 parses to infinity; like NaN it is written as null (JSONL, CSV): the output stays
    strict JSON. A non-finite query or answer is refused like NaN: not a string."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the output"))

    src = tmp_path / "logs.jsonl"
    src.write_text('{"query": "Hi", "answer": "Hello.", "x": 1e999, "y": -1e999, "z": NaN, '
                   '"m": {"v": [1e999, NaN, 1.5]}}\n'
                   '{"query": "Hi", "answer": 1e999}\n{"query": "Hi", "answer": NaN}\n')
    summary = run_batch(src, tmp_path / "out.jsonl", pipeline, show_progress=False)
    assert summary.scored == 1 and summary.errors == 2
    rows = [strict(line) for line in open(tmp_path / "out.jsonl", encoding="utf-8")]
    assert (rows[0]["x"], rows[0]["y"], rows[0]["z"]) == (None, None, None)
    assert rows[0]["m"] == {"v": [None, None, 1.5]} and rows[0]["error"] is None
    assert rows[1]["error"].endswith("'answer' must be a string, got float") and rows[1]["answer"] is None
    assert rows[2]["error"].endswith("'answer' must be a string, got float")
    run_batch(src, tmp_path / "out.csv", pipeline, show_progress=False)
    df = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert list(df.loc[0, ["x", "y", "z"]]) == ["", "", ""] and strict(df.loc[0, "m"]) == {"v": [None, None, 1.5]}


def test_stale_temporaries_of_killed_runs_are_removed(pipeline, tmp_path):
    """A run killed while writing leaves its hidden temporary file beside --out; the next run for
    the same --out removes it, and the part folders earlier versions wrote for Parquet. A running
    job's (its PID is alive), another host's (its PID cannot be checked), another output's and
    anything not ours are kept."""
    from pipeline.io import _HOST

    src = tmp_path / "logs.jsonl"
    src.write_text(json.dumps({"query": "Hi", "answer": "Hello."}) + "\n")
    kill = ("import os, sys; from pipeline.io import RowWriter; "
            "w = RowWriter(sys.argv[1]); w.write([{'a': 1}]); "
            "getattr(w, '_fh', None) and w._fh.flush(); os._exit(9)")
    for name in ("out.jsonl", "out.parquet"):  # really killed runs, with the names they really leave
        res = subprocess.run([sys.executable, "-c", kill, str(tmp_path / name)], cwd=REPO_ROOT, timeout=120)
        assert res.returncode == 9
    left = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
    assert len(left) == 2 and all(n.endswith(".partial") for n in left)
    assert {n.split(".")[1] for n in left} == {"out"} and any(".out.parquet." in n for n in left)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60).stdout.strip()
    stale = {".out.jsonl.partial", f".out.jsonl.{_HOST}.{dead}.0123abcd.partial.wide"}
    keep = {f".out.jsonl.{_HOST}.{os.getpid()}.0123abcd.partial",  # a job still running
            f".out.jsonl.otherhost.{dead}.0123abcd.partial",  # written on another host
            f".other.jsonl.{_HOST}.{dead}.0123abcd.partial",  # another output's
            ".out.jsonl.partial.bak", ".out.jsonl.notes", ".parts-x1y2z3"}
    for n in stale | keep:
        (tmp_path / n).write_text("x")
    foreign = tmp_path / f".out.parquet.{_HOST}.{dead}.0123abcd.parts"  # holds a file that is not a part
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    old_parts = tmp_path / f".out.parquet.{_HOST}.{dead}.4567cdef.parts"  # an earlier version's part folder
    old_parts.mkdir()
    pq.write_table(pa.table({"a": [1]}), old_parts / "part-000000.parquet")
    run_batch(src, tmp_path / "out.jsonl", pipeline, show_progress=False)
    run_batch(src, tmp_path / "out.parquet", pipeline, show_progress=False)
    now = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
    assert now == keep | {foreign.name} and (foreign / "notes.txt").exists()
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1 and pq.read_table(tmp_path / "out.parquet").num_rows == 1


def test_chat_messages_rows(pipeline, inspector):
    row = {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "first"},
                        {"role": "assistant", "content": "one"}, {"role": "user", "content": "last q"},
                        {"role": "assistant", "content": "last a"}]}
    assert extract_pair(row) == ("last q", "last a")
    assert extract_pair({"messages": json.dumps(row["messages"])}) == ("last q", "last a")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        extract_pair({"messages": ["not a dict"]})


def test_csv_quoting_and_embedded_newlines(pipeline, tmp_path):
    src = tmp_path / "logs.csv"
    rows = [{"id": "1", "query": 'He said "hi", then left', "answer": "Line one\nLine two, with comma"},
            {"id": "2", "query": "Empty answer?", "answer": ""},
            {"id": "3", "query": "NA", "answer": "NULL"}]
    with src.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "query", "answer"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out.csv"
    run_batch(src, out, pipeline, show_progress=False)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(df["id"]) == ["1", "2", "3"]
    assert df.loc[0, "answer"] == "Line one\nLine two, with comma"
    assert df.loc[0, "query"] == 'He said "hi", then left'
    assert df.loc[0, "error"] == "" and float(df.loc[0, "inspector_score"]) >= 0
    assert "'answer' is empty" in df.loc[1, "error"]
    assert df.loc[2, "error"] == ""  # "NA"/"NULL" are text, not missing values
    assert list(df.columns[:3]) == ["id", "query", "answer"] and set(ADDED) <= set(df.columns)


def test_malformed_csv_records_become_error_rows(pipeline, tmp_path):
    """An unquoted comma or a cut-off line spoils one record, not the job: it becomes an error row
    with its text and line number (counting the lines of quoted multi-line answers)."""
    src = tmp_path / "logs.csv"
    src.write_text('id,query,answer\n1,Hi,"Hello,\nthere"\n2,What is 2+2?,4, obviously\n\n3,Bye\n'
                   '4,"A ""quoted"" word?",Yes\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    summary = run_batch(src, out, pipeline, chunk_rows=2, show_progress=False)
    rows = read_jsonl(out)
    assert summary.rows == 4 and summary.errors == 2 and summary.scored == 2
    assert [r.get("id") for r in rows] == ["1", None, None, "4"]
    assert rows[0]["answer"] == "Hello,\nthere" and rows[3]["query"] == 'A "quoted" word?'
    assert rows[1]["raw"] == "2,What is 2+2?,4, obviously"
    assert "line 4: 4 fields, but the header has 3 (id, query, answer); quote fields" in rows[1]["error"]
    assert rows[2]["raw"] == "3,Bye" and "line 6: 2 fields" in rows[2]["error"]


def test_csv_output_keeps_columns_that_appear_late(pipeline, tmp_path):
    """CSV output has one header: a column first seen in a later chunk (a bad line's ``raw``, a
    field only some rows have) widens it, earlier rows padded, no value dropped."""
    src = tmp_path / "logs.jsonl"
    src.write_text("\n".join([json.dumps({"query": "Hi", "answer": "Hello."}),
                              json.dumps({"query": "Bye", "answer": "Goodbye."}),
                              '{"query": "cut',
                              json.dumps({"query": "Colour?", "answer": "Blue.", "user": "u7"})]) + "\n")
    out = tmp_path / "out.csv"
    run_batch(src, out, pipeline, chunk_rows=2, show_progress=False)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df) == 4 and list(df.columns[-2:]) == ["raw", "user"]
    assert df.loc[2, "raw"] == '{"query": "cut' and "line 3" in df.loc[2, "error"]
    assert df.loc[3, "user"] == "u7" and df.loc[3, "error"] == "" and float(df.loc[3, "inspector_score"]) >= 0
    assert (df.loc[:1, ["raw", "user"]] == "").all().all()
    assert not list(tmp_path.glob(".*"))  # no partial or widening files left behind


def test_awkward_but_readable_logs_keep_every_value(pipeline, tmp_path):
    """A BOM, a log's own `error`/`flagged` columns, a CSV with both pair columns and `messages`, a
    repeated CSV header name, and fields whose type changes between rows (Parquet output): all
    scored, every value kept."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"query": "How do I bake bread?", "answer": "Mix flour.",
                                                  "error": "upstream timeout", "flagged": "by-user"}).encode() + b"\n")
    run_batch(bom, tmp_path / "bom_out.jsonl", pipeline, show_progress=False)
    (row,) = read_jsonl(tmp_path / "bom_out.jsonl")
    assert row["error"] is None and isinstance(row["flagged"], bool) and row["inspector_score"] is not None
    assert (row["input_error"], row["input_flagged"]) == ("upstream timeout", "by-user")

    csv_in = tmp_path / "mixed.csv"
    csv_in.write_text('id,query,answer,messages,query\n1,How do I bake bread?,Mix flour.,,dup\n'
                      '2,,,"[{""role"":""user"",""content"":""hi""},{""role"":""assistant"",""content"":""hello""}]",\n')
    summary = run_batch(csv_in, tmp_path / "mixed_out.jsonl", pipeline, show_progress=False)
    rows = read_jsonl(tmp_path / "mixed_out.jsonl")
    assert summary.errors == 0 and summary.scored == 2
    assert rows[0]["query"] == "How do I bake bread?" and rows[0]["query.1"] == "dup"

    mixed = tmp_path / "types.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "query": "Hi", "answer": "Hello.", "meta": {"a": 1}},
        {"id": "abc", "query": "Bye", "answer": "Goodbye.", "meta": "x"},
        {"id": 3, "query": "Colour?", "answer": "Blue.", "meta": [1, 2]}]) + "\n")
    for chunk_rows in (1, 256):  # types that change across chunks, and inside one
        out = tmp_path / f"types_{chunk_rows}.parquet"
        run_batch(mixed, out, pipeline, chunk_rows=chunk_rows, show_progress=False)
        df = pd.read_parquet(out)
        assert list(df["id"]) == ["1", "abc", "3"] and list(df["meta"]) == ['{"a": 1}', "x", "[1, 2]"]
        assert df["inspector_score"].notna().all()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_input_without_rows_gives_an_output_with_its_columns(pipeline, tmp_path):
    (tmp_path / "hdr.csv").write_text("query,answer,user_id,error\n")
    summary = run_batch(tmp_path / "hdr.csv", tmp_path / "hdr_out.csv", pipeline, show_progress=False)
    assert summary.rows == 0
    assert (tmp_path / "hdr_out.csv").read_text().strip().split(",") == ["query", "answer", "user_id",
                                                                         "input_error", *ADDED]
    pq.write_table(pa.table({"query": pa.array([], pa.string()), "answer": pa.array([], pa.string()),
                             "n": pa.array([], pa.int64())}), tmp_path / "empty.parquet")
    run_batch(tmp_path / "empty.parquet", tmp_path / "empty_out.parquet", pipeline, show_progress=False)
    schema = pq.read_schema(tmp_path / "empty_out.parquet")
    assert schema.names == ["query", "answer", "n", *ADDED] and schema.field("n").type == pa.int64()
    assert pq.read_metadata(tmp_path / "empty_out.parquet").num_rows == 0
    # the annotation columns are typed as when rows come, not text
    assert (schema.field("inspector_score").type, schema.field("flagged").type) == (pa.float64(), pa.bool_())
    assert schema.field("corrected_score").type == pa.float64() and schema.field("error").type == pa.string()


def test_parquet_types_round_trip(pipeline, tmp_path):
    src = tmp_path / "logs.parquet"
    table = pa.table({
        "turn": pa.array([1, 2, 3], pa.int32()),
        "ts": pa.array(pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"])),
        "query": ["What is the boiling point of water?", None, "Say hi"],
        "answer": ["100 C at sea level.", "orphan answer", "Hi!"],
        "meta": [{"lang": "en"}, {"lang": "fr"}, {"lang": "en"}],
    })
    pq.write_table(table, src)
    out = tmp_path / "out.parquet"
    run_batch(src, out, pipeline, chunk_rows=2, show_progress=False)
    got = pq.read_table(out)
    assert got.num_rows == 3
    assert got.schema.field("turn").type == pa.int32()
    assert pa.types.is_timestamp(got.schema.field("ts").type)
    assert got.schema.field("inspector_score").type == pa.float64()
    assert got.schema.field("flagged").type == pa.bool_()
    d = got.to_pylist()
    assert d[1]["error"] and "'query' is missing" in d[1]["error"] and d[1]["inspector_score"] is None
    assert d[0]["meta"] == {"lang": "en"} and d[2]["error"] is None


def test_parquet_output_is_one_streamed_file_with_its_schema_settled_up_front(pipeline, tmp_path, monkeypatch):
    """Parquet output is written by one ParquetWriter as the chunks come (no part files, nothing
    re-read): one file, rows in order, the schema settled before the first row. A JSONL input is
    read once more for it, so a field only late rows carry keeps its column and type, a field
    whose type changes is text, and the annotation columns have their own types."""
    import pipeline.io as pio

    src = tmp_path / "logs.jsonl"
    rows_in = read_jsonl(LOGS)
    rows_in[-1] = {**rows_in[-1], "user_id": 7, "tags": ["late"]}  # only in the last chunk
    rows_in[3] = {**rows_in[3], "turn": 2}
    rows_in[20] = {**rows_in[20], "turn": 2.5}  # int here, float there: float64
    src.write_text("".join(json.dumps(r) + "\n" for r in rows_in) + '{"query": "cut\n')
    monkeypatch.setattr(pio, "ROW_GROUP_ROWS", 10)  # several row groups, one file
    opened = []
    real = pq.ParquetWriter

    class Spy(real):
        def __init__(self, where, schema, *a, **kw):
            opened.append((str(where), schema))
            super().__init__(where, schema, *a, **kw)

    monkeypatch.setattr(pq, "ParquetWriter", Spy)
    out = tmp_path / "out.parquet"
    summary = run_batch(src, out, pipeline, chunk_rows=5, show_progress=False)
    assert len(opened) == 1 and opened[0][0].endswith(".partial")  # one writer, one temporary file
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 37 == summary.rows and meta.num_row_groups == 4
    got = pq.read_table(out)
    assert got.schema == opened[0][1]  # the schema settled before the first row is the file's
    types = {f.name: f.type for f in got.schema}
    assert types["user_id"] == pa.int64() and types["tags"] == pa.list_(pa.string())
    assert types["turn"] == pa.float64() and types["raw"] == pa.string()
    assert (types["inspector_score"], types["flagged"], types["reason"]) == (pa.float64(), pa.bool_(), pa.string())
    assert got.schema.names[-len(ADDED):] == ADDED
    d = got.to_pylist()
    assert [r.get("conversation_id") for r in d[:36]] == [r.get("conversation_id") for r in rows_in]
    assert d[35]["user_id"] == 7 and d[35]["tags"] == ["late"] and d[0]["user_id"] is None
    assert (d[3]["turn"], d[20]["turn"]) == (2.0, 2.5)
    assert d[36]["raw"] == '{"query": "cut' and "line 37" in d[36]["error"]
    assert [r["reason"] for r in d[:36]] == [("no_aligner" if r["flagged"] else None) for r in d[:36]]


def test_json_array_input_reads_like_jsonl(pipeline, tmp_path):
    """A .json input is one JSON array of objects (docs/batch.md): the same rows as the JSON Lines
    file holding them; an item that is not an object is an error row; a .json holding one object
    per line is refused with what to do."""
    rows_in = read_jsonl(LOGS)[:6]
    (tmp_path / "logs.json").write_text(json.dumps(rows_in[:3] + [[1, 2]] + rows_in[3:], indent=2))
    (tmp_path / "logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    a = run_batch(tmp_path / "logs.json", tmp_path / "a.jsonl", pipeline, chunk_rows=2, show_progress=False)
    b = run_batch(tmp_path / "logs.jsonl", tmp_path / "b.jsonl", pipeline, show_progress=False)
    got, want = read_jsonl(tmp_path / "a.jsonl"), read_jsonl(tmp_path / "b.jsonl")
    assert a.rows == 7 and a.errors == 1 and b.errors == 0
    assert got[3]["raw"] == "[\n    1,\n    2\n  ]" and "item 4: expected a JSON object, got list" in got[3]["error"]
    assert [r["conversation_id"] for r in got[:3] + got[4:]] == [r["conversation_id"] for r in want]
    np.testing.assert_allclose([r["inspector_score"] for r in got[:3] + got[4:]],
                               [r["inspector_score"] for r in want], atol=1e-6)
    (tmp_path / "lines.json").write_text((tmp_path / "logs.jsonl").read_text())
    with pytest.raises(InputError, match=r"lines.json: line 1: expected a JSON array of objects .* name it .jsonl"):
        run_batch(tmp_path / "lines.json", tmp_path / "c.jsonl", pipeline, show_progress=False)
    assert not (tmp_path / "c.jsonl").exists()


def test_threshold_override_and_fail_closed(inspector, tmp_path):
    pipe = ModerationPipeline(inspector, None, PipelineConfig(threshold=0.0, fallback="fail_closed"))
    out = tmp_path / "closed.jsonl"
    run_batch(LOGS, out, pipe, show_progress=False)
    rows = read_jsonl(out)
    assert all(r["flagged"] for r in rows)
    assert all(r["fallback"] == "fail_closed" and r["corrected_answer"] for r in rows)
    assert all(r["reason"] == "no_aligner" for r in rows)
    assert route(np.array([0.2, 0.5, 0.9]), 0.5).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="fallback policy"):
        PipelineConfig(fallback="ignore")
    with pytest.raises(ValueError, match="threshold"):
        PipelineConfig(threshold=3)


@pytest.mark.slow  # the batch CLI in subprocesses
def test_cli_end_to_end_and_unreadable_inputs(tmp_path):
    out = tmp_path / "scored.parquet"
    res = subprocess.run([sys.executable, "-m", "pipeline.batch", str(LOGS), "--out", str(out),
                          "--aligner", "none", "--no-progress"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stderr.strip().splitlines()[-1])
    assert summary["rows"] == 36 and summary["errors"] == 0 and summary["pairs_per_s"] > 0
    assert 0 < summary["flagged_pct"] < 100
    assert pq.read_table(out).num_rows == 36

    for args, message in [([str(tmp_path / "missing.jsonl")], "no such file"),
                          ([str(LOGS.with_suffix(".txt"))], "unsupported format '.txt'")]:
        res = subprocess.run([sys.executable, "-m", "pipeline.batch", *args, "--out",
                              str(tmp_path / "o.jsonl")], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=300)
        assert res.returncode == 2 and message in res.stderr


@pytest.mark.slow  # the batch CLI twice, float32 and int8
def test_cli_int8_scores_with_the_quantised_encoder(pipeline, tmp_path):
    """--int8 reaches the inspector: the CLI's scores are the int8 inspector's, not the float32 ones."""
    from pipeline.batch import main
    from pipeline.ray_engine import InspectStage

    out = tmp_path / "int8.jsonl"
    assert main([str(LOGS), "--out", str(out), "--aligner", "none", "--int8", "--no-progress"]) == 0
    got = np.array([r["inspector_score"] for r in read_jsonl(out)])
    ref, plain = tmp_path / "ref.jsonl", tmp_path / "float32.jsonl"
    run_batch(LOGS, ref, ModerationPipeline(Inspector.load(int8=True)), show_progress=False)
    run_batch(LOGS, plain, pipeline, show_progress=False)
    want = np.array([r["inspector_score"] for r in read_jsonl(ref)])
    float32 = np.array([r["inspector_score"] for r in read_jsonl(plain)])
    assert len(got) == 36 and np.allclose(got, want, atol=1e-6)
    assert np.abs(got - float32).max() > 1e-3
    # the Ray engine's inspect stage builds the same int8 pipeline (constructed directly: no Ray needed)
    stage = InspectStage(None, None, "fail_open", None, "query", "answer", int8=True)
    assert stage.pipeline.inspector.encoder.int8


def test_unparseable_csv_is_an_input_error(pipeline, tmp_path):
    src = tmp_path / "broken.csv"
    src.write_text('query,answer\n"unterminated, quote\n')
    with pytest.raises(InputError, match="cannot parse CSV"):
        run_batch(src, tmp_path / "o.jsonl", pipeline, show_progress=False)
    assert not (tmp_path / "o.jsonl").exists()
