"""Append-only JSONL journals: the work record that makes ``generate`` resumable.

One line per finished work item, written and flushed as soon as the item is done, so an
interruption loses only items still in flight. A line cut short by a kill is skipped (with a
warning) on the next load, and the next append starts on a fresh line. When a key appears more
than once (a transient error retried later), the last line wins.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def sibling(out: str | Path, tag: str) -> Path:
    """``data/harm.jsonl`` + ``inspector`` -> ``data/harm.inspector.jsonl``."""
    out = Path(out)
    stem = out.name[:-6] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{tag}.jsonl")


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSONL file and the 1-based numbers of lines that did not parse."""
    rows, bad = [], []
    if not path.exists():
        return rows, bad
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(i)
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad.append(i)
    return rows, bad


class Journal:
    """Append-only JSONL file of records keyed by ``key``; flushes after every row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = None

    def load(self) -> dict[str, dict]:
        rows, bad = read_jsonl(self.path)
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (%s), e.g. cut short by an interruption; "
                        "their items will be redone", self.path, len(bad), ", ".join(map(str, bad[:10])))
        latest: dict[str, dict] = {}
        for r in rows:
            if isinstance(r.get("key"), str):
                latest.pop(r["key"], None)  # keep file order of the latest version
                latest[r["key"]] = r
        return latest

    def append(self, record: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._fh = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._fh.write("\n")
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Derived files are rewritten whole: write a temp file, then rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
