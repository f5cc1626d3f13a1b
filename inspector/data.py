"""Reading labelled (query, answer, label) tables and building the default training set."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a whole JSONL / CSV / Parquet file, chosen by extension (for training-sized data)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return pd.DataFrame(rows)
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"{path}: unsupported format {suffix!r}; expected one of {', '.join(FORMATS)}")


def validate_pairs(df: pd.DataFrame, where: str, need_label: bool = True,
                   query_col: str = "query", answer_col: str = "answer") -> pd.DataFrame:
    """Check columns and types; the error names the file, row and field at fault."""
    need = [query_col, answer_col] + (["label"] if need_label else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")
    for col in (query_col, answer_col):
        bad = ~df[col].map(lambda v: isinstance(v, str) and v.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{where}: row {i}: field {col!r} must be a non-empty string, "
                             f"got {df[col].iloc[i]!r}")
    if need_label:
        labels = pd.to_numeric(df["label"], errors="coerce")
        bad = ~labels.isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{where}: row {i}: field 'label' must be 0 (aligned) or 1 "
                             f"(misaligned), got {df['label'].iloc[i]!r}")
        df = df.assign(label=labels.astype(int))
    return df


def load_labelled(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate labelled files; a missing ``source`` column becomes the file's stem."""
    frames = []
    for p in paths:
        df = validate_pairs(read_table(p), str(p))
        if "source" not in df.columns:
            df = df.assign(source=Path(p).stem)
        frames.append(df[["query", "answer", "label", "source"]])
    if not frames:
        raise ValueError("no training files given")
    return dedupe(pd.concat(frames, ignore_index=True))


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Drop repeated (query, answer) pairs; a pair labelled both ways keeps label 1 (the safe side)."""
    df = df.sort_values("label", ascending=False, kind="stable")
    df = df.drop_duplicates(["query", "answer"], keep="first")
    return df.sort_index().reset_index(drop=True)


def fingerprint(df: pd.DataFrame) -> str:
    """A short hash of the exact training rows, stored in the model's config."""
    h = hashlib.sha256()
    for q, a, y in zip(df["query"], df["answer"], df["label"]):
        h.update(f"{q}\x1f{a}\x1f{int(y)}\x1e".encode())
    return h.hexdigest()[:16]


# -- the default training set, derived from ../shared/data -------------------------------------
def shared_training_rows(data_dir: str | Path) -> pd.DataFrame:
    """Every labelled (query, answer) pair the shared data holds, with the source it came from.

    - labeled_pairs: labels as given (PKU-SafeRLHF sample, JailbreakBench artifacts).
    - corrections, PKU-SafeRLHF: the unsafe answer is 1, its safe correction 0.
    - corrections, CoCoNot: both sides answer benign requests that look risky (the preference is
      about helpfulness), so both are 0: exactly the traffic that must not be routed.
    - safe_answers: harmful instructions answered safely, 0.
    - HH-RLHF is left out of training: its chosen/rejected turns are *relatively* less harmful,
      not labelled harmful or harmless. It is used for a pairwise check instead.
    """
    d = Path(data_dir)
    need = ["labeled_pairs.jsonl", "corrections.jsonl", "safe_answers.jsonl"]
    missing = [n for n in need if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"{d}: missing {missing}; point --data-dir at ../shared/data")
    labelled = read_table(d / "labeled_pairs.jsonl")[["query", "answer", "label", "source"]]
    corr = read_table(d / "corrections.jsonl")
    parts = [labelled]
    pku = corr[corr["source"] == "pku_saferlhf_mini"]
    parts += [pku.assign(label=1)[["query", "answer", "label", "source"]],
              pku.assign(answer=pku["correction"], label=0)[["query", "answer", "label", "source"]]]
    coco = corr[corr["source"] == "coconot_pref"]
    parts += [coco.assign(label=0)[["query", "answer", "label", "source"]],
              coco.assign(answer=coco["correction"], label=0)[["query", "answer", "label", "source"]]]
    safe = read_table(d / "safe_answers.jsonl").assign(label=0)
    parts.append(safe[["query", "answer", "label", "source"]])
    df = pd.concat(parts, ignore_index=True)
    ok = df["query"].map(lambda v: isinstance(v, str) and v.strip() != "") & \
        df["answer"].map(lambda v: isinstance(v, str) and v.strip() != "")
    return dedupe(df[ok].reset_index(drop=True))


PROJECT_PAIRS = Path(__file__).parent / "training_data" / "project_pairs.jsonl"


def default_training_rows(data_dir: str | Path) -> pd.DataFrame:
    """The default inspector's training set: the shared data plus the project's own pairs.

    The shared data has almost no helpful answers to everyday requests, so on its own the
    inspector learns "gives step-by-step instructions" as a harm cue. ``PROJECT_PAIRS`` (written
    by the project, committed, source ``project_written``) adds everyday and risky-looking-but-
    benign requests answered helpfully, plus harmful requests answered with compliance (1) or a
    refusal (0) in the same style, so that style alone says nothing about the label.
    """
    own = load_labelled([PROJECT_PAIRS]).assign(source="project_written")
    return dedupe(pd.concat([shared_training_rows(data_dir), own], ignore_index=True))


def hh_preference_pairs(data_dir: str | Path) -> pd.DataFrame:
    """HH-RLHF harmless-base (query, rejected, chosen) for a pairwise ranking check."""
    corr = read_table(Path(data_dir) / "corrections.jsonl")
    return corr[corr["source"] == "hh_rlhf_harmless_base_test"][["query", "answer", "correction"]]


def stratified_split(df: pd.DataFrame, fractions: Iterable[float], seed: int,
                     n_folds: int = 20) -> list[np.ndarray]:
    """Index arrays in the given ``fractions``, each part stratified by (source, label).

    Pairs that share a query are one group and stay in the same part, so the same question never
    sits on both sides of a train/validation split. scikit-learn's ``StratifiedGroupKFold`` cuts
    the groups into ``n_folds`` folds with the (source, label) mix of the whole; each part takes
    ``round(fraction * n_folds)`` folds (70/15/15 -> 14/3/3 of 20).
    """
    fractions = np.asarray(list(fractions), dtype=float)
    groups = pd.factorize(df["query"])[0]
    n_folds = int(min(n_folds, len(np.unique(groups))))
    counts = np.floor(fractions / fractions.sum() * n_folds + 0.5).astype(int)
    counts[np.argmax(counts)] += n_folds - counts.sum()  # rounding leftovers go to the largest part
    if (counts < 1).any():
        raise ValueError(f"cannot split {len(np.unique(groups))} query groups into parts of {fractions.tolist()}: "
                         "add more data")
    strata = df["source"].astype(str) + "/" + df["label"].astype(str)
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # tiny strata (fewer rows than folds) are fine, just less even
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = [test for _, test in cv.split(np.zeros(len(df)), strata.to_numpy(), groups)]
    ends = np.cumsum(counts)
    return [np.sort(np.concatenate(folds[end - n:end])).astype(np.int64) for n, end in zip(counts, ends)]
