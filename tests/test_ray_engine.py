"""``python -m pipeline.batch --engine ray``: same rows, schema, scores, corrections and summary as
the local engine, on the shared local Ray (``ray_cluster``), with bad lines kept as error rows."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from conftest import EXAMPLES
from pipeline.batch import build_pipeline, main, run_batch
from pipeline.ray_engine import PAYLOAD, ROW, _pack, _write_in_order, read_blocks, run_ray_batch
from pipeline.tables import InputError, read_chunks

BAD_LINES = [
    json.dumps({"id": "b1", "query": "What is 2+2?", "answer": "4."}),
    '{"id": "b2", "query": "broken json", "answer": ',
    json.dumps({"id": "b3", "query": "Hi", "answer": ""}),
    json.dumps({"id": "b4", "query": "Hi"}),
    "[1, 2, 3]",
    json.dumps({"id": "b6", "query": "Name a colour.", "answer": "Blue."}),
]
FLOATS = ("inspector_score", "corrected_score")


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def mixed_logs(tmp_path_factory):
    """The example chat logs (pairs and ``messages`` rows) followed by invalid lines."""
    path = tmp_path_factory.mktemp("ray") / "logs.jsonl"
    path.write_text((EXAMPLES / "chat_logs.jsonl").read_text() + "\n".join(BAD_LINES) + "\n")
    return path


def test_ray_engine_matches_local_engine(ray_cluster, mixed_logs, tmp_path, capsys):
    from aligner.tiny import build_tiny_aligner

    tiny = str(build_tiny_aligner(tmp_path / "tiny-aligner", "causal", max_new_tokens=8))
    ray_out, local_out = tmp_path / "ray.jsonl", tmp_path / "local.jsonl"
    rc = main([str(mixed_logs), "--out", str(ray_out), "--engine", "ray", "--aligner", tiny,
               "--chunk-rows", "5", "--no-progress"])
    assert rc == 0
    ray_summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])

    pipe = build_pipeline(None, None, tiny, "fail_open", None)
    local_summary = run_batch(mixed_logs, local_out, pipe, chunk_rows=5, show_progress=False).to_dict()

    a, b = read_jsonl(ray_out), read_jsonl(local_out)
    assert len(a) == len(b) == 42
    for ra, rb in zip(a, b, strict=True):
        assert list(ra) == list(rb)  # same columns, same order, row by row (input order kept)
        assert {k: v for k, v in ra.items() if k not in FLOATS} == {k: v for k, v in rb.items() if k not in FLOATS}
        for k in FLOATS:
            assert (ra[k] is None) == (rb[k] is None)
            if ra[k] is not None:
                assert ra[k] == pytest.approx(rb[k], abs=1e-6)
    # the invalid lines are error rows in place, with the local engine's messages
    assert [r.get("id") for r in a[36:]] == ["b1", None, "b3", "b4", None, "b6"]
    assert "line 38" in a[37]["error"] and "row 39" in a[38]["error"]
    # flagged rows went through the aligner stage and were re-inspected
    flagged = [r for r in a if r["flagged"]]
    assert flagged and all(r["corrected_score"] is not None or r["fallback"] for r in flagged)
    for key in ("seconds", "pairs_per_s"):
        ray_summary.pop(key), local_summary.pop(key)
    ray_summary.pop("output")
    # blank input lines are counted by the local engine's reader only (the Ray engine reads in remote tasks)
    assert "blank_lines" not in ray_summary and local_summary.pop("blank_lines") == 0
    assert ray_summary == local_summary
    assert ray_summary["errors"] == 4 and ray_summary["rows"] == 42


def test_unreadable_input_is_a_clear_error(ray_cluster, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('query,answer\n"unterminated,foo\nx,y\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match="cannot parse CSV") as info:
        run_ray_batch(bad, out, show_progress=False)
    assert "Traceback" not in str(info.value)
    assert not out.exists()  # no half-written output


def test_bad_arguments_fail_before_ray_starts(tmp_path, capsys):
    logs = EXAMPLES / "chat_logs.jsonl"
    with pytest.raises(InputError, match="no such file"):
        run_ray_batch(tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(InputError, match="must differ"):
        run_ray_batch(logs, logs)
    with pytest.raises(ValueError, match="threshold"):
        run_ray_batch(logs, tmp_path / "o.jsonl", threshold=1.5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_ray_batch(logs, tmp_path / "o.jsonl", inspector_dir=str(tmp_path / "nowhere"))
    assert main([str(logs), "--out", str(tmp_path / "o.txt"), "--engine", "ray"]) == 2
    assert "unsupported format '.txt'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_read_blocks_carry_rows_in_order(tmp_path, fmt):
    df = pd.DataFrame({"query": [f"q{i}" for i in range(7)], "answer": [f"a{i}" for i in range(7)]})
    path = tmp_path / f"logs.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    for source in (str(path), path.resolve().as_uri()):  # a plain path, and a URI read via pyarrow.fs
        blocks = list(read_blocks(source, chunk_rows=3))
        assert [b.num_rows for b in blocks] == [3, 3, 1]
        idx = np.concatenate([b[ROW].to_numpy() for b in blocks])
        rows = [pickle.loads(x) for b in blocks for x in b[PAYLOAD].to_pylist()]
        assert idx.tolist() == list(range(7))
        assert rows == [r for chunk in read_chunks(path, 100) for r in chunk]


def test_driver_writes_parquet_with_the_settled_schema_and_counts_like_the_local_engine(tmp_path):
    """The driver's side of the Ray engine, without Ray: finished batches stream into one Parquet
    file whose schema ``jobs.output_schema`` settled from the input, and the summary is
    ``Summary.add`` over the finished rows, as the local engine counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.jobs import Summary, output_schema

    src = tmp_path / "logs.jsonl"
    src.write_text('{"query": "q", "answer": "a", "n": 1}\n{"query": "q2", "answer": "a2", "late": [1]}\n')
    done = [{"query": "q", "answer": "a", "n": 1, "inspector_score": 0.9, "flagged": True,
             "corrected_answer": None, "corrected_score": None, "fallback": "fail_open", "reason": "no_aligner",
             "error": None},
            {"query": "q2", "answer": "a2", "late": [1], "inspector_score": None, "flagged": None,
             "corrected_answer": None, "corrected_score": None, "fallback": None, "reason": None,
             "error": "row 2: scoring failed: boom"}]

    class Finished:  # what ds.iter_batches hands the driver: packed batches, in order
        def iter_batches(self, **kw):
            yield _pack([0], done[:1])
            yield _pack([1], done[1:])

    out = tmp_path / "out.parquet"
    summary = _write_in_order(Finished(), out, output_schema(src), show_progress=False)
    got = pq.read_table(out)
    assert got.num_rows == 2 and got.schema.field("late").type == pa.list_(pa.int64())
    assert got.schema.field("n").type == pa.int64() and got.column("reason").to_pylist() == ["no_aligner", None]
    want = Summary()
    want.add(done)
    summary.seconds = want.seconds = 0.0
    assert summary.to_dict() == want.to_dict()
    assert want.to_dict()["fallback_reasons"] == {"no_aligner": 1} and want.errors == 1
