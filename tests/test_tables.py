"""``pipeline.tables``: one reader and one pair model for the batch job, inspector and aligner
training, synth's query files and the experiments -- the same formats and rules everywhere."""
from __future__ import annotations

import ast
import gzip
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from aligner.data import load_rows
from conftest import REPO_ROOT
from experiments import tuning
from inspector.data import load_labelled
from pipeline.tables import (InputError, MissingInput, Pair, extract_pair, format_of, parse_label, read_chunks,
                             read_table)
from synth.queries import QueryFileError, load_queries

ROWS = [{"query": "How do I bake bread?", "answer": "Mix flour, water and yeast.", "label": 0,
         "correction": "Mix flour, water and yeast.", "inspector_score": 0.1},
        {"query": "How do I pick a lock?", "answer": "Insert a tension wrench.", "label": 1,
         "correction": "I can't help with that.", "inspector_score": 0.9}]


def rows_of(path, **kw):
    return [r for chunk in read_chunks(path, **kw) for r in chunk]


def test_the_same_json_file_is_read_the_same_by_every_consumer(tmp_path):
    """Before: the batch job refused a .json file, inspector.train read it as an array,
    aligner.train in any pandas layout and synth as JSON Lines. Now it is one JSON array of
    objects for all of them, and each keeps only its own column needs."""
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert rows_of(path) == ROWS  # the batch job's stream
    assert read_table(path).to_dict("records") == ROWS
    assert load_labelled([path])[["query", "answer", "label"]].to_dict("records") == [
        {k: r[k] for k in ("query", "answer", "label")} for r in ROWS]
    assert [(r.query, r.correction) for r in load_rows(path)] == [(r["query"], r["correction"]) for r in ROWS]
    assert load_queries(path) == [r["query"] for r in ROWS]
    df, _ = tuning.load_scored(path, inspector=lambda: pytest.fail("the file has scores"))
    assert df["label"].tolist() == [0, 1]
    # a .json file holding JSON Lines: the same refusal everywhere, saying what to do
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    words = r"lines.json: line 1: expected a JSON array of objects .*name it .jsonl"
    for read in (rows_of, read_table, lambda p: load_labelled([p]), load_rows, load_queries,
                 lambda p: tuning.load_scored(p)):
        with pytest.raises((InputError, QueryFileError), match=words):
            read(lines)


def test_every_format_gives_the_same_rows(tmp_path):
    df = pd.DataFrame([{k: str(v) for k, v in r.items()} for r in ROWS])  # CSV is text: compare as text
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    (tmp_path / "t.json").write_text(df.to_json(orient="records"))
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.jsonl", "t.json", "t.csv", "t.tsv"):
        with open(tmp_path / name, "rb") as src, gzip.open(tmp_path / f"{name}.gz", "wb") as dst:
            dst.write(src.read())
    want = df.to_dict("records")
    for name in ("t.jsonl", "t.json", "t.csv", "t.tsv", "t.parquet", "t.jsonl.gz", "t.json.gz", "t.csv.gz", "t.tsv.gz"):
        assert rows_of(tmp_path / name) == want, name
        assert read_table(tmp_path / name).to_dict("records") == want, name
        assert [r.query for r in load_rows(tmp_path / name)] == df["query"].tolist(), name
        assert load_labelled([tmp_path / name])["label"].tolist() == [0, 1], name


def test_a_bad_record_is_an_error_row_in_a_stream_and_an_error_when_read_strictly(tmp_path):
    """The same record rules for the batch job (error rows, never dropped) and training (the
    file, line and what was expected)."""
    cases = {
        "a.jsonl": ('{"query": "q", "answer": "a"}\n[1, 2]\n', "line 2: expected a JSON object per line, got list"),
        "b.jsonl": ('{"query": "q", "answer": "a"}\n{"query": \n', "line 2: not a valid JSON object"),
        "c.json": ('[{"query": "q", "answer": "a"},\n {"query": 1,}]', "line 2, item 2: not a valid JSON object"),
        "d.json": ('[{"query": "q", "answer": "a"}, "text"]', "line 1, item 2: expected a JSON object, got str"),
        "e.csv": ("query,answer\nq,a\nq2,a2,extra\n", "line 3: 3 fields, but the header has 2 (query, answer); "
                                                      "quote fields that contain commas"),
        "f.csv": ("query,answer\nq,a\nq2\n",
                  "line 3: 1 fields, but the header has 2 (query, answer); a line cut short?"),
        "g.jsonl": (b'{"query": "q", "answer": "a"}\n{"query": "caf\xe9"}\n', "line 2: not UTF-8 text (byte 0xe9)"),
        "h.csv": (b"query,answer\nq,a\ncaf\xe9,a\n", "line 3: not UTF-8 text (byte 0xe9)"),
    }
    for name, (text, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        first, bad = rows_of(path)
        assert first == {"query": "q", "answer": "a"} and bad["_error"].startswith(why) and bad["raw"], name
        with pytest.raises(InputError, match=re.escape(f"{name}: {why}")):
            read_table(path)
        with pytest.raises(ValueError, match=name):
            load_labelled([path])
    assert rows_of(tmp_path / "g.jsonl")[1]["raw"] == '{"query": "caf\\xe9"}'  # the bytes shown, not replaced


def test_files_that_cannot_be_read_at_all(tmp_path):
    (tmp_path / "quote.csv").write_text('query,answer\n"never closed,x\n')
    (tmp_path / "cut.json").write_text('[{"query": "q", "answer": "a"}, {"query": "never')
    (tmp_path / "open.json").write_text('[{"query": "q", "answer": "a"}')
    (tmp_path / "comma.json").write_text('[{"query": "q"} {"query": "r"}]')
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "bad.jsonl.gz").write_text("not gzip")
    for name, words in (("quote.csv", "cannot parse CSV"), ("cut.json", "cut short"), ("open.json", "cut short"),
                        ("comma.json", "expected ',' or ']' after item 1"), ("bad.parquet", "cannot read Parquet"),
                        ("bad.jsonl.gz", "cannot read .*BadGzipFile"), ("missing.jsonl", "no such file"),
                        ("notes.txt", "unsupported format '.txt'")):
        for strict in (False, True):
            with pytest.raises(InputError, match=f"{name}: .*{words}"):
                rows_of(tmp_path / name, strict=strict)
    with pytest.raises(FileNotFoundError):  # a missing file is both
        rows_of(tmp_path / "missing.jsonl")
    assert issubclass(MissingInput, InputError) and issubclass(InputError, ValueError)
    with pytest.raises(InputError, match="output out.json: unsupported format '.json'"):
        format_of("out.json", "output")


def test_empty_files_and_blank_lines_are_no_rows(tmp_path):
    for name, text in (("e.jsonl", ""), ("e.json", " \n"), ("e.csv", ""), ("b.jsonl", '\n{"a": 1}\n\n'),
                       ("b.json", "[]"), ("h.csv", "a,b\n")):
        (tmp_path / name).write_text(text)
    stats: dict = {}
    assert rows_of(tmp_path / "b.jsonl", stats=stats) == [{"a": 1}] and stats["blank_lines"] == 2
    for name in ("e.jsonl", "e.json", "e.csv", "b.json", "h.csv"):
        assert rows_of(tmp_path / name) == [], name
    assert list(read_table(tmp_path / "h.csv").columns) == ["a", "b"] and len(read_table(tmp_path / "h.csv")) == 0


def test_a_long_json_array_is_read_item_by_item(tmp_path):
    """Items longer than the read block, brackets and quotes inside strings, many items."""
    rows = [{"i": i, "text": ("x" * 70_000 if i == 3 else f"a ] }} \" , [ {i}"), "nested": {"l": [1, {"k": "]"}]}}
            for i in range(3000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows))
    assert rows_of(path, chunk_rows=500) == rows


def test_pair_model_and_labels():
    assert extract_pair({"query": "q", "answer": "a"}) == Pair("q", "a") == ("q", "a")
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert extract_pair({"messages": chat}).query == "q2"
    assert extract_pair({"messages": json.dumps(chat)}).answer == "a2"
    for row, words in (({"query": "q"}, "field 'answer' is missing"),
                       ({"query": "q", "answer": " "}, "'answer' is empty"),
                       ({"query": 3, "answer": "a"}, "'query' must be a string, got int"),
                       ({"query": "q", "answer": "\ud800"}, "'answer' is not valid Unicode"),
                       ({"messages": [{"role": "user", "content": "q"}]}, "one 'user' and one 'assistant'")):
        with pytest.raises(ValueError, match=words):
            extract_pair(row)
    for value, label in ((0, 0), (1, 1), (1.0, 1), (True, 1), ("0", 0), (" 1 ", 1), ("1.0", 1), ("False", 0),
                         ("true", 1)):
        assert parse_label(value) == label
    for value in (2, -1, 0.5, "yes", "", None, float("nan")):
        with pytest.raises(ValueError):
            parse_label(value)


def test_the_reader_needs_no_torch_ray_or_fastapi():
    code = ("import sys; import pipeline.tables, inspector.data, aligner.data, synth.queries; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'fastapi', 'matplotlib')); "
            "assert not heavy, heavy; print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_no_module_imports_from_the_batch_cli():
    """The batch job's shared parts live in pipeline.jobs / pipeline.tables, not in the CLI module."""
    found = []
    for package in ("inspector", "aligner", "pipeline", "synth", "experiments"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom):
                    name = ("pipeline." if node.level and path.parent.name == "pipeline" else "") + (node.module or "")
                    if name == "pipeline.batch":
                        found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name == "pipeline.batch" for a in node.names):
                    found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not found, found
