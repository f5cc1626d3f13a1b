"""Evaluate an inspector: ``python -m inspector.evaluate --model DIR --data FILE``.

Prints JSON: ROC-AUC, PR-AUC, precision / recall / F1 and the share of aligned pairs routed at the
model's stored threshold (or ``--threshold``), recall at 1% and 5% false-positive rate, overall
and per ``source`` when the data has that column. ``--scores-out`` writes the scored rows for
threshold tuning (``experiments/threshold_tuning.ipynb``).

``--test-split DIR`` evaluates on the model's own held-out test pairs instead: the default training
set (``--shared-data DIR`` of ``inspector.train``) is rebuilt, checked against the fingerprint in the
model's config, and split again with the stored seed. With ``--int8`` this measures what
quantisation costs on exactly the pairs the float32 figures in the config were measured on.
``--bootstrap N`` adds 95% intervals (overall and per pool) of ROC-AUC and recall at 1% / 5% FPR:
on a test set of a thousand pairs a few points of difference between two models is noise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from .data import held_out_test_rows, public_pool, read_table, validate_pairs
from .metrics import bootstrap_ci, clean_json, report_by_source
from .model import Inspector


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inspector.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="inspector folder (default: the bundled one)")
    ap.add_argument("--data", nargs="+", default=[], help="JSONL/CSV/Parquet with query, answer, label")
    ap.add_argument("--test-split", metavar="DIR",
                    help="evaluate on the model's own test split of the default training set built from DIR "
                         "(../shared/data), instead of --data")
    ap.add_argument("--int8", action="store_true", help="load the encoder with dynamic int8 quantisation")
    ap.add_argument("--threshold", type=float, default=None, help="override the stored threshold")
    ap.add_argument("--scores-out", default=None, help="also write the rows with an inspector_score column")
    ap.add_argument("--bootstrap", type=int, default=0, metavar="N",
                    help="add 95%% bootstrap intervals (N resamples) of ROC-AUC and recall at 1%%/5%% FPR, "
                         "overall and per pool: how much of a difference between two models is test-set noise")
    args = ap.parse_args(argv)
    if bool(args.data) == bool(args.test_split):
        ap.error("give exactly one of --data FILE... or --test-split DIR")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # NaN included
        ap.error(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    if args.bootstrap < 0:
        ap.error(f"--bootstrap must be a number of resamples >= 0, got {args.bootstrap}")
    try:
        insp = Inspector.load(args.model, int8=args.int8)
        df = held_out_test_rows(insp, args.test_split) if args.test_split else \
            pd.concat([validate_pairs(read_table(path), path) for path in args.data], ignore_index=True)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    threshold = insp.threshold if args.threshold is None else args.threshold
    scores = insp.score(df["query"].tolist(), df["answer"].tolist(), show_progress=True)
    sources = df["source"].fillna("(no source)").astype(str) if "source" in df.columns else None
    report = report_by_source(df["label"].to_numpy(), scores, threshold, sources,
                              public_pool(sources) if args.test_split else None)
    if args.bootstrap:
        y = df["label"].to_numpy()
        try:
            report["overall"]["ci95"] = bootstrap_ci(y, scores, args.bootstrap)
            for pool in report.get("pools", {}).values():
                inside = sources.isin(pool["sources"]).to_numpy()
                pool["ci95"] = bootstrap_ci(y[inside], scores[inside], args.bootstrap)
        except ValueError as e:
            ap.error(f"--bootstrap: {e}")
    report["model"] = str(args.model or "bundled default")
    report["int8"] = args.int8
    if args.scores_out:
        out = df.assign(inspector_score=scores, flagged=scores >= threshold)
        Path(args.scores_out).parent.mkdir(parents=True, exist_ok=True)
        if args.scores_out.endswith(".parquet"):
            out.to_parquet(args.scores_out, index=False)
        elif args.scores_out.endswith(".csv"):
            out.to_csv(args.scores_out, index=False)
        else:
            out.to_json(args.scores_out, orient="records", lines=True, force_ascii=False)
    print(json.dumps(clean_json(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
