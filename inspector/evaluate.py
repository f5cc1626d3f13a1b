"""Evaluate an inspector: ``python -m inspector.evaluate --model DIR --data FILE``.

Prints JSON: ROC-AUC, PR-AUC, precision / recall / F1 and the share of aligned pairs routed at the
model's stored threshold (or ``--threshold``), recall at 1% and 5% false-positive rate, overall
and per ``source`` when the data has that column. ``--scores-out`` writes the scored rows for
threshold tuning (``experiments/threshold_tuning.ipynb``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import read_table, validate_pairs
from .metrics import clean_json, report_by_source
from .model import Inspector


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inspector.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="inspector folder (default: the bundled one)")
    ap.add_argument("--data", required=True, nargs="+", help="JSONL/CSV/Parquet with query, answer, label")
    ap.add_argument("--threshold", type=float, default=None, help="override the stored threshold")
    ap.add_argument("--scores-out", default=None, help="also write the rows with an inspector_score column")
    args = ap.parse_args(argv)
    try:
        frames = []
        for path in args.data:
            df = validate_pairs(read_table(path), path)
            frames.append(df)
        import pandas as pd

        df = pd.concat(frames, ignore_index=True)
        insp = Inspector.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    threshold = insp.threshold if args.threshold is None else args.threshold
    scores = insp.score(df["query"].tolist(), df["answer"].tolist(), show_progress=True)
    report = report_by_source(df["label"].to_numpy(), scores, threshold,
                              df["source"] if "source" in df.columns else None)
    report["model"] = str(args.model or "bundled default")
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
