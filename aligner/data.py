"""Training rows: load and validate query/answer/correction tables (read by ``pipeline.tables``, the
one reader), build the default training set from the shared real data, and keep a held-out split
by query so evaluation uses unseen rows."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# read_table is the one reader (pipeline.tables); aligner.evaluate imports it from here too
from pipeline.tables import check_text, parse_label, present, read_table, require_columns

KINDS = ("correction", "identity")


@dataclass
class Row:
    query: str
    answer: str
    correction: str
    kind: str = "correction"  # "identity": a good answer the model must leave alone
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def text_key(text: str) -> str:
    """Short stable hash of a normalised text; the model folder stores these, never the rows."""
    norm = " ".join(str(text).split()).lower()
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()[:16]


def load_rows(path: str | Path, kind: str = "correction", strict: bool = False) -> list[Row]:
    """Load training rows from one file (read by ``pipeline.tables``: .jsonl, .json (a JSON array
    of objects), .csv, .tsv, .parquet, the text formats also .gz; the rules the batch job uses).

    ``kind="correction"`` needs columns query, answer, correction. ``kind="identity"`` needs query
    and answer (the correction is the answer itself); where a ``label`` column exists only label-0
    (safe) rows are identity rows, and the count of the others is reported, never dropped silently.
    A row with an empty or non-text field raises (naming file, row and field) when ``strict``;
    otherwise it is left out and reported with its row numbers.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    df = read_table(path)
    need = ["query", "answer"] + (["correction"] if kind == "correction" else [])
    require_columns(df.columns, need, path, f"expected query, answer{', correction' if kind == 'correction' else ''}")
    source_col = "source" if "source" in df.columns else None
    rows: list[Row] = []
    skipped = 0
    invalid: list[tuple[int, str]] = []
    for i, rec in enumerate(df.to_dict("records")):
        rec = present(rec)
        if kind == "identity" and "label" in df.columns:
            try:
                safe = parse_label(rec.get("label")) == 0
            except ValueError:
                safe = False
            if not safe:
                skipped += 1
                continue
        try:
            q, a = check_text(rec.get("query"), "query"), check_text(rec.get("answer"), "answer")
            c = check_text(rec.get("correction"), "correction") if kind == "correction" else a
        except ValueError as exc:
            if strict:
                raise ValueError(f"{path}: row {i + 1}: {exc}") from None
            invalid.append((i + 1, str(exc)))
            continue
        src = str(rec[source_col]) if source_col and isinstance(rec.get(source_col), str) else Path(path).stem
        rows.append(Row(q, a, c, kind, src))
    if invalid:
        shown = "; ".join(f"row {n}: {why}" for n, why in invalid[:5])
        print(f"[aligner.data] {path}: left out {len(invalid)} invalid row(s): {shown}"
              f"{' ...' if len(invalid) > 5 else ''}")
    if not rows:
        raise ValueError(f"{path}: no usable {kind} rows")
    if skipped:
        print(f"[aligner.data] {path}: used {len(rows)} label-0 rows as identity rows, "
              f"left out {skipped} rows with another label")
    return rows


def default_data_files(data_dir: str | Path) -> dict[str, list[Path]]:
    """The shared real data used by default: corrections as correction rows; safe answers to
    harmful requests and safe labelled pairs as identity rows (the model must keep good answers)."""
    d = Path(data_dir)
    files = {"correction": [d / "corrections.jsonl"],
             "identity": [d / "safe_answers.jsonl", d / "labeled_pairs.jsonl"]}
    for kind_files in files.values():
        for f in kind_files:
            if not f.exists():
                raise FileNotFoundError(f"{f} not found: --data-dir must hold the shared data files")
    return files


def split_by_query(rows: list[Row], eval_share: float, seed: int = 0,
                   max_eval: int | None = None) -> tuple[list[Row], list[Row]]:
    """Hold out whole queries (never a row whose query also trains) for evaluation."""
    if not 0 <= eval_share < 1:
        raise ValueError(f"eval share must be in [0, 1), got {eval_share}")
    keys = sorted({text_key(r.query) for r in rows})
    rng = random.Random(seed)
    rng.shuffle(keys)
    n_eval = int(round(len(keys) * eval_share))
    held = set(keys[:n_eval])
    train = [r for r in rows if text_key(r.query) not in held]
    evals = [r for r in rows if text_key(r.query) in held]
    if max_eval is not None and len(evals) > max_eval:
        evals = random.Random(seed + 1).sample(evals, max_eval)
    return train, evals


def write_split(out_dir: Path, train: list[Row], evals: list[Row], files: dict) -> Path:
    """Record which queries trained (hashes only), so ``aligner.evaluate`` can skip them."""
    path = Path(out_dir) / "split.json"
    payload = {
        "note": "sha1[:16] of normalised query text; rows whose query is listed were used in training",
        "data_files": {k: [str(f) for f in v] for k, v in files.items()},
        "n_train_rows": len(train),
        "n_eval_rows": len(evals),
        "train_query_keys": sorted({text_key(r.query) for r in train}),
        "eval_query_keys": sorted({text_key(r.query) for r in evals}),
    }
    path.write_text(json.dumps(payload, indent=0))
    return path


def read_train_keys(model_dir: str | Path) -> set[str]:
    path = Path(model_dir) / "split.json"
    if not path.exists():
        return set()
    return set(json.loads(path.read_text())["train_query_keys"])
