"""Labelled (query, answer, label) tables and the default training set.

Files are read by ``pipeline.tables`` (``read_table``: .jsonl, .json (a JSON array of objects),
.csv, .tsv, .parquet, the text formats also .gz), with the formats and rules the batch job uses."""
from __future__ import annotations

import hashlib
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

# read_table is the one reader (pipeline.tables); inspector.evaluate and experiments import it from here too
from pipeline.tables import check_text, is_missing, parse_label, read_table, require_columns, shown


def validate_pairs(df: pd.DataFrame, where: str, need_label: bool = True,
                   query_col: str = "query", answer_col: str = "answer") -> pd.DataFrame:
    """Check columns and values by the rules every reader shares (``pipeline.tables``); the error
    names the file, row (1 = the first data row, as in the batch job's errors) and field at fault."""
    if len(df) == 0:
        raise ValueError(f"{where}: no rows")
    require_columns(df.columns, [query_col, answer_col] + (["label"] if need_label else []), where)
    for col in (query_col, answer_col):
        for i, v in enumerate(df[col].tolist()):
            try:
                check_text(None if is_missing(v) else v, col)
            except ValueError as e:
                raise ValueError(f"{where}: row {i + 1}: {e}") from None
    if need_label:
        labels = []
        for i, v in enumerate(df["label"].tolist()):
            try:
                labels.append(parse_label(v))
            except ValueError:
                raise ValueError(f"{where}: row {i + 1}: field 'label' must be 0 (aligned) or 1 "
                                 f"(misaligned), got {shown(v)}") from None
        df = df.assign(label=np.asarray(labels, dtype=int))
    return df


def load_labelled(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate labelled files; a missing ``source`` column becomes the file's stem."""
    frames = []
    for p in paths:
        df = validate_pairs(read_table(p), str(p))
        if "source" not in df.columns:
            df = df.assign(source=Path(p).stem)
        else:  # a missing cell too: every pair needs a source for the split and the per-source figures
            blank = df["source"].isna() | (df["source"].astype(str).str.strip() == "")
            df = df.assign(source=df["source"].astype(object).where(~blank, Path(p).stem).astype(str))
        frames.append(df[["query", "answer", "label", "source"]])
    if not frames:
        raise ValueError("no training files given")
    return dedupe(pd.concat(frames, ignore_index=True))


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Drop repeated (query, answer) pairs; a pair labelled both ways keeps label 1 (the safe side)."""
    df = df.sort_values("label", ascending=False, kind="stable")
    df = df.drop_duplicates(["query", "answer"], keep="first")
    return df.sort_index().reset_index(drop=True)


def pair_id(query: str, answer: str) -> str:
    """A short, stable name for one (query, answer) pair: lets committed files (label reviews)
    refer to shared-data rows without copying their text."""
    return hashlib.sha256(f"{query}\x1f{answer}".encode()).hexdigest()[:16]


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
    # the second round of shared data: more kinds of traffic (labels as given), and SafeUnlearning's
    # (request, compliance, refusal) triples as a 1 and a 0 that share a prompt
    if (d / "labeled_pairs_extra.jsonl").exists():
        more = read_table(d / "labeled_pairs_extra.jsonl")
        # DiaSafety calls a reply that gives medical or legal advice unsafe; this product does not,
        # so those replies are a source of their own that a recipe can leave out (inspector.study)
        expertise = (more["source"] == "diasafety") & (more.get("category") == "Unauthorized Expertise")
        more.loc[expertise, "source"] = "diasafety_expertise"
        parts.append(more[["query", "answer", "label", "source"]])
    if (d / "corrections_extra.jsonl").exists():
        extra = read_table(d / "corrections_extra.jsonl")
        parts += [extra.assign(label=1)[["query", "answer", "label", "source"]],
                  extra.assign(answer=extra["correction"], label=0)[["query", "answer", "label", "source"]]]
    df = pd.concat(parts, ignore_index=True)
    ok = df["query"].map(lambda v: isinstance(v, str) and v.strip() != "") & \
        df["answer"].map(lambda v: isinstance(v, str) and v.strip() != "")
    return dedupe(df[ok].reset_index(drop=True))


PROJECT_DATA = Path(__file__).parent / "training_data"
# the project's own pairs (committed, written by the project), by the source name they train under
PROJECT_FILES = {"project_written": PROJECT_DATA / "project_pairs.jsonl",
                 "project_grey_zone": PROJECT_DATA / "grey_zone_pairs.jsonl"}
PROJECT_SOURCES = tuple(PROJECT_FILES)
PROJECT_PAIRS = PROJECT_FILES["project_written"]


def candidate_training_rows(data_dir: str | Path) -> pd.DataFrame:
    """Every labelled pair there is to choose from: all shared sources plus the project's own pairs."""
    own = [load_labelled([path]).assign(source=name) for name, path in PROJECT_FILES.items()]
    return dedupe(pd.concat([shared_training_rows(data_dir), *own], ignore_index=True))


# The default build's choice of data, decided by the leave-one-source-out study (``inspector.study``;
# the model card in inspector/default_model/README.md gives each decision's measured effect).
DEFAULT_EXCLUDED_SOURCES = ("diasafety_expertise", "safeunlearning")  # advice is not harm; no licence
DEFAULT_CAP_PER_SOURCE = 2500


def default_training_rows(data_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDED_SOURCES,
                          cap: int | None = DEFAULT_CAP_PER_SOURCE, seed: int = 0) -> pd.DataFrame:
    """The default inspector's training set: the shared data plus the project's own pairs, without
    the ``exclude`` sources, at most ``cap`` pairs per source (``cap_per_source``, drawn with ``seed``).

    The shared data has almost no helpful answers to everyday requests, so on its own the
    inspector learns "gives step-by-step instructions" as a harm cue. ``PROJECT_PAIRS`` (source
    ``project_written``) adds everyday and risky-looking-but-benign requests answered helpfully,
    plus harmful requests answered with compliance (1) or a refusal (0) in the same style, so that
    style alone says nothing about the label. ``project_grey_zone`` pairs dubious everyday requests
    with two answers in the same plain style, one going along with the intent (1) and one
    responsible (0): the grey zone where the public data is thinnest. ``training_data/README.md``
    describes both files.
    """
    df = candidate_training_rows(data_dir)
    unknown = sorted(set(exclude) - set(df["source"]))
    if unknown:
        raise ValueError(f"excluded source(s) {unknown} are not in the data; sources are {sorted(set(df['source']))}")
    df = df[~df["source"].isin(list(exclude))].reset_index(drop=True)
    return cap_per_source(df, cap, seed)


def cap_per_source(df: pd.DataFrame, cap: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``cap`` pairs from each source, drawn at random by whole query groups (answers to
    one query stay together), labels in proportion: a source of 11k chit-chat replies then weighs
    about as much as one of 1.5k jailbreak answers, and the build stays within its time budget."""
    if not cap:
        return df
    if cap < 1:
        raise ValueError(f"the per-source cap must be at least 1 pair, got {cap}")
    keep = []
    for source, rows in df.groupby("source", sort=True):
        # each source draws from its own stream: the same pairs whichever other sources are present
        rng = np.random.default_rng([seed, zlib.crc32(str(source).encode())])
        if len(rows) <= cap:
            keep.append(rows.index.to_numpy())
            continue
        groups = pd.factorize(rows["query"])[0]
        taken, n = [], 0
        for g in rng.permutation(groups.max() + 1):
            members = rows.index.to_numpy()[groups == g]
            if n + len(members) > cap:
                continue
            taken.append(members)
            n += len(members)
        keep.append(np.concatenate(taken))
    return df.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def public_pool(sources) -> dict[str, list[str]] | None:
    """``{"public_sources": [...]}``: the sources that are not the project's own pairs, for a pooled
    headline of what the public data alone says (None when there is nothing to separate)."""
    present = set(map(str, sources))
    public = sorted(present - set(PROJECT_SOURCES))
    return {"public_sources": public} if public and len(public) < len(present) else None


def hh_preference_pairs(data_dir: str | Path) -> pd.DataFrame:
    """HH-RLHF harmless-base (query, rejected, chosen) for a pairwise ranking check."""
    corr = read_table(Path(data_dir) / "corrections.jsonl")
    return corr[corr["source"] == "hh_rlhf_harmless_base_test"][["query", "answer", "correction"]]


# train / calibration / test shares of every inspector build; ``evaluate --test-split`` re-splits with them
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


def stratified_split(df: pd.DataFrame, fractions: Iterable[float], seed: int,
                     n_folds: int = 20) -> list[np.ndarray]:
    """Index arrays in the given ``fractions``, each part stratified by (source, label).

    Pairs that share a query are one group and stay in the same part, so the same question never
    sits on both sides of a train/validation split. Each source is split on its own: scikit-learn's
    ``StratifiedGroupKFold`` cuts its query groups into ``n_folds`` folds with the label mix of the
    source, and each part takes ``round(fraction * n_folds)`` folds (70/15/15 -> 14/3/3 of 20). So
    adding or removing a source never moves another source's pairs between parts, and metrics on a
    source stay comparable as the training set grows. A query asked in several sources goes with the
    first of them; a source with very few query groups may land wholly in the first part.
    """
    fractions = np.asarray(list(fractions), dtype=float)
    groups = pd.factorize(df["query"])[0]
    home = df["source"].astype(str).groupby(groups).transform("first").to_numpy()
    labels = df["label"].astype(str).to_numpy()
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for source in sorted(set(home)):
        rows = np.flatnonzero(home == source)
        # scikit-learn refuses more folds than groups, or than the larger class has rows
        k = int(min(n_folds, len(np.unique(groups[rows])), np.unique(labels[rows], return_counts=True)[1].max()))
        if k < 2:
            parts[0].append(rows)
            continue
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # tiny strata (fewer rows than folds) are fine, just less even
            warnings.filterwarnings("ignore", message="The least populated class")
            folds = [rows[test] for _, test in cv.split(rows, labels[rows], groups[rows])]
        counts = np.floor(fractions / fractions.sum() * k + 0.5).astype(int)
        counts[np.argmax(counts)] += k - counts.sum()  # rounding leftovers go to the largest part
        for part, chosen in zip(parts, np.split(np.arange(k), np.cumsum(counts)[:-1])):
            part.extend(folds[i] for i in chosen)
    out = [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]
    if any(len(p) == 0 for p in out):
        raise ValueError(f"cannot split {len(np.unique(groups))} query groups into parts of "
                         f"{fractions.tolist()}: add more data")
    return out


def held_out_test_rows(insp, data_dir: str) -> pd.DataFrame:
    """The test pairs the model was measured on at build time (same rows, same seed)."""
    return held_out_rows(insp, data_dir)[1]


def held_out_rows(insp, data_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(calibration pairs, test pairs) of the model's build: neither was trained on."""
    # the selection the build made from the shared data (builds before it existed: every source then, no cap)
    sel = insp.config.get("default_selection", {"excluded_sources": [], "max_per_source": None, "seed": 0})
    df = default_training_rows(data_dir, sel["excluded_sources"], sel["max_per_source"], sel["seed"])
    want = insp.config.get("training_data", {}).get("fingerprint")
    if want != fingerprint(df):
        raise ValueError(f"the default training set built from {data_dir} (fingerprint {fingerprint(df)}) is "
                         f"not what this model was trained on ({want}); --test-split needs the same data")
    seed = insp.config.get("metrics", {}).get("split", {}).get("seed")
    if seed is None:
        raise ValueError("the model's config.json has no metrics.split.seed: it was not built by inspector.train")
    _, cal, test = stratified_split(df, SPLIT_FRACTIONS, seed)
    return df.loc[cal].reset_index(drop=True), df.loc[test].reset_index(drop=True)
