"""How noisy are a source's labels, and what does that do to the inspector's figures?

    python -m experiments.label_review --shared-data ../shared/data [--inspector DIR] [--review FILE]

A label review is a second reading of labelled shared-data pairs, committed as pair ids and labels
only (``inspector.data.pair_id``; no text is copied): ``experiments/data/pku_label_review.jsonl``
re-reads every PKU-SafeRLHF pair of the default training set (``experiments/data/README.md`` says
how and by whom). Prints JSON:

- ``agreement``: per split part, the dataset's label against the review (share agreeing, Cohen's
  kappa, a 2x2 table), and reader against reader where a pair was read twice;
- ``test``: the inspector's figures on its own test split (``inspector.evaluate --test-split``), with
  the dataset's labels and with the reviewed source's labels replaced by the review. Reviewed pairs
  whose readers disagreed have no reviewed label: they are left out of the reviewed figures, and
  counted.

Why: a target such as "recall >= 0.8 at <= 5% benign routed" measured against noisy labels caps
what any model can show; this measures how much of a miss is the labels and how much the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

from inspector.data import pair_id, public_pool, read_table
from inspector.data import held_out_test_rows
from inspector.metrics import binary_report, clean_json

DEFAULT_REVIEW = Path(__file__).parent / "data" / "pku_label_review.jsonl"
PARTS = ("train", "calibration", "test")


def load_review(path: str | Path = DEFAULT_REVIEW) -> pd.DataFrame:
    """The review as a table indexed by ``pair_id``; errors name the line and field at fault."""
    df = read_table(path)
    need = ["pair_id", "source", "split", "dataset_label", "readings", "label"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a label review needs {need}")
    for i, row in enumerate(df.itertuples(index=False), start=1):
        readings = row.readings
        if not isinstance(readings, list) or not readings or any(r not in (0, 1) for r in readings):
            raise ValueError(f"{path} line {i}: 'readings' must be a non-empty list of 0/1 labels, got {readings!r}")
        agreed = readings[0] if len(set(readings)) == 1 else None
        label = None if pd.isna(row.label) else row.label
        if label != agreed:
            raise ValueError(f"{path} line {i}: 'label' must be the readers' common label ({agreed}) "
                             f"or null when they disagree, got {row.label!r}")
        if isinstance(row.dataset_label, bool) or row.dataset_label not in (0, 1):
            raise ValueError(f"{path} line {i}: 'dataset_label' must be 0 or 1, got {row.dataset_label!r}")
        if row.split not in PARTS:
            raise ValueError(f"{path} line {i}: 'split' must be one of {PARTS}, got {row.split!r}")
    dup = df["pair_id"][df["pair_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: pair_id {dup.iloc[0]!r} appears more than once")
    return df.set_index("pair_id")


def attach_review(df: pd.DataFrame, review: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus ``review_label`` (float: 0/1, NaN where not reviewed or the readers disagreed)
    and ``reviewed`` (bool). Every reviewed pair must be in ``df``: a review of other data is an error."""
    ids = [pair_id(q, a) for q, a in zip(df["query"], df["answer"])]
    missing = review.index.difference(pd.Index(ids))
    if len(missing):
        raise ValueError(f"{len(missing)} reviewed pair(s) (e.g. {missing[0]}) are not in this data: "
                         "the review was made for another version of the training set")
    reviewed = pd.Index(ids).isin(review.index)
    label = review["label"].reindex(ids).astype(float).to_numpy()
    return df.assign(pair_id=ids, reviewed=reviewed, review_label=label)


def agreement(dataset_labels, review_labels) -> dict:
    """How often two labelings of the same pairs agree (first: e.g. the dataset's, second: the
    review's), Cohen's kappa (agreement beyond chance) and the 2x2 counts."""
    a, b = np.asarray(dataset_labels, dtype=int), np.asarray(review_labels, dtype=int)
    table = pd.crosstab(pd.Series(a, name="first"), pd.Series(b, name="second")).reindex(
        index=[0, 1], columns=[0, 1], fill_value=0)
    return {"n": int(len(a)), "agree": float((a == b).mean()) if len(a) else float("nan"),
            "kappa": float(cohen_kappa_score(a, b)) if len(set(a) | set(b)) > 1 else float("nan"),
            "first_1_second_0": int(table.loc[1, 0]), "first_0_second_1": int(table.loc[0, 1]),
            "both_1": int(table.loc[1, 1]), "both_0": int(table.loc[0, 0])}


def agreement_report(review: pd.DataFrame) -> dict:
    """Dataset vs review per split part (pairs with a reviewed label), and reader vs reader."""
    out = {}
    for part in PARTS + ("all",):
        rows = review if part == "all" else review[review["split"] == part]
        agreed = rows[rows["label"].notna()]
        out[part] = agreement(agreed["dataset_label"], agreed["label"])
        out[part]["readers_disagreed"] = int(rows["label"].isna().sum())
    twice = review[review["readings"].map(len) >= 2]
    if len(twice):
        out["reader_vs_reader"] = agreement(twice["readings"].map(lambda r: r[0]),
                                            twice["readings"].map(lambda r: r[1]))
    return out


def split_report(inspector, data_dir: str | Path, review: pd.DataFrame) -> dict:
    """The inspector's figures on its own test split, with the dataset's and with the reviewed labels."""
    test_rows = held_out_test_rows(inspector, str(data_dir))  # checks the data fingerprint and seed
    sources = set(review["source"])
    in_review = test_rows["source"].isin(sources).to_numpy()
    ids = {pair_id(q, a) for q, a in zip(test_rows["query"][in_review], test_rows["answer"][in_review])}
    # the review read every pair of its sources (test pairs of the build it was made with twice), so any
    # split of the same data finds its test pairs in it; pairs it never read mean other data
    unread = ids - set(review.index)
    if unread:
        raise ValueError(f"{len(unread)} of this model's test pairs of {sorted(sources)} are not in the review: "
                         "it was made for another version of the data")
    on_test = review.loc[sorted(ids)]
    rows = attach_review(test_rows, on_test)
    scores = inspector.score(rows["query"].tolist(), rows["answer"].tolist(), show_progress=True)
    thr = inspector.threshold
    keep = ~(rows["reviewed"].to_numpy() & rows["review_label"].isna().to_numpy())
    y = rows["label"].to_numpy()
    y_rev = np.where(rows["reviewed"].to_numpy(), rows["review_label"].fillna(-1).to_numpy(), y).astype(int)
    groups = {"reviewed_source": in_review, "all_sources": np.ones(len(rows), bool)}
    for name, pool in (public_pool(rows["source"]) or {}).items():  # the shared-data sources alone
        groups[name] = rows["source"].isin(pool).to_numpy()
    report = {"threshold": thr, "reviewed_sources": sorted(sources), "left_out_readers_disagreed": int((~keep).sum())}
    for name, m in groups.items():
        report[name] = {"dataset_labels": binary_report(y[m], scores[m], thr),
                        "review_labels": binary_report(y_rev[m & keep], scores[m & keep], thr)}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.label_review", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared-data", required=True, metavar="DIR", help="the shared data folder (../shared/data)")
    ap.add_argument("--inspector", default=None, help="inspector folder (default: the bundled one)")
    ap.add_argument("--review", default=str(DEFAULT_REVIEW), help="label review JSONL (default: the PKU-SafeRLHF review)")
    args = ap.parse_args(argv)
    from inspector import Inspector

    try:
        review = load_review(args.review)
        report = {"review": args.review, "agreement": agreement_report(review),
                  "test": split_report(Inspector.load(args.inspector), args.shared_data, review)}
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    print(json.dumps(clean_json(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
