"""Re-set a built inspector's threshold from the scores it will really give.

``python -m inspector.retune --model DIR --shared-data ../shared/data --span-pooling sentences``

The training run chooses the threshold from window scores it computes on the fly. When the scoring
changes after the adapters are trained (``span_pooling = "sentences"`` adds sentence runs to the
maximum, edge windows add two short windows: both raise benign scores too), the threshold must be
chosen again, by the same rule, from ``Inspector.score`` on the build's own calibration pairs; the
stored test figures (and the HH-RLHF pairwise check, where the build made one) are recomputed on
its test pairs. ``inspector.train`` calls ``retune`` itself
when its recipe pools sentence runs or scores edge windows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import pandas as pd

from .metrics import binary_report, clean_json, report_by_source, threshold_for_rule
from .model import Inspector


def retune(inspector: Inspector, cal: pd.DataFrame, test: pd.DataFrame, threshold_rule: str,
           target_fpr: float, pools: dict | None = None, show_progress: bool = True) -> tuple[Inspector, dict]:
    """(inspector with the new threshold, metric updates): the threshold by ``threshold_rule`` at
    ``target_fpr`` on ``cal``'s full-path scores; test and calibration figures at it."""
    t0 = time.time()
    s_cal = inspector.score(cal["query"].tolist(), cal["answer"].tolist(), show_progress=show_progress)
    y_cal = cal["label"].to_numpy()
    threshold = threshold_for_rule(y_cal, s_cal, cal["source"].to_numpy(), threshold_rule, target_fpr)
    s_test = inspector.score(test["query"].tolist(), test["answer"].tolist(), show_progress=show_progress)
    updates = {
        "random_split_test": report_by_source(test["label"].to_numpy(), s_test, threshold,
                                              test["source"].to_numpy(), pools),
        "calibration": binary_report(y_cal, s_cal, threshold),
        "threshold_scored_by": f"Inspector.score (span_pooling={inspector.encoder.recipe.span_pooling!r}, "
                               f"edge_length={inspector.encoder.recipe.edge_length}, "
                               f"edge_margin={inspector.encoder.recipe.edge_margin}) "
                               f"on the calibration and test pairs, {time.time() - t0:.0f} s",
    }
    return inspector.with_threshold(threshold), updates


def main(argv: list[str] | None = None) -> int:
    from .data import public_pool
    from .data import held_out_rows

    ap = argparse.ArgumentParser(prog="python -m inspector.retune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="inspector folder built by inspector.train (rewritten)")
    ap.add_argument("--shared-data", required=True, metavar="DIR", help="the data it was built from")
    ap.add_argument("--span-pooling", choices=("none", "sentences"), default=None,
                    help="set the recipe's span pooling first (default: keep the model's)")
    ap.add_argument("--max-length", type=int, default=None, metavar="N",
                    help="set the window length in word pieces first (default: keep; the bundled 256). "
                         "Shorter windows resist dilution more, cost more passes and read less context "
                         "(measured: the model card's evasion section)")
    ap.add_argument("--edge-length", type=int, default=None, metavar="N",
                    help="set the edge windows' length first (0 = off; the bundled 128): answers longer "
                         "than that also get their first and last N word pieces scored on their own")
    ap.add_argument("--edge-margin", type=float, default=None, metavar="LOGODDS",
                    help="set how many log-odds lower edge windows count first (the bundled 0.4)")
    ap.add_argument("--threshold-rule", choices=("pooled", "balanced"), default=None,
                    help="default: the rule the model was built with")
    ap.add_argument("--target-fpr", type=float, default=None, help="default: the model's target")
    args = ap.parse_args(argv)
    try:
        insp = Inspector.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    rule = args.threshold_rule or insp.config.get("threshold_rule_name", "pooled")
    target = args.target_fpr if args.target_fpr is not None else insp.config.get("target_benign_routed", 0.05)
    if not 0 < target < 1:
        ap.error(f"--target-fpr is a share between 0 and 1, got {target}")
    changes = {k: v for k, v in (("span_pooling", args.span_pooling), ("max_length", args.max_length),
                                 ("edge_length", args.edge_length), ("edge_margin", args.edge_margin))
               if v is not None}
    if args.max_length is not None:
        limit = insp.encoder.model.max_seq_length
        if not 32 <= args.max_length <= limit:
            ap.error(f"--max-length must be between 32 and the embedder's {limit}, got {args.max_length}")
        changes["stride"] = min(insp.encoder.recipe.stride, args.max_length // 8)
    if changes:
        try:
            insp.encoder.recipe = dataclasses.replace(insp.encoder.recipe, **changes)
        except ValueError as e:
            ap.error(str(e))
    try:  # the build's own calibration and test pairs (after the cheap checks above)
        cal, test = held_out_rows(insp, args.shared_data)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    before = insp.threshold
    tuned, updates = retune(insp, cal, test, rule, target, public_pool(test["source"]))
    metrics = {**tuned.config.get("metrics", {}), **updates}
    if "hh_rlhf_pairwise" in metrics:  # the build's pairwise check, at the new scoring and threshold
        from .train import hh_pairwise

        metrics["hh_rlhf_pairwise"] = hh_pairwise(tuned, args.shared_data,
                                                  seed=metrics.get("finetune", {}).get("seed", 0))
    tuned.config.update({"metrics": metrics, "threshold_rule_name": rule, "target_benign_routed": target})
    tuned.save(args.model)
    print(json.dumps(clean_json({"threshold_before": before, "threshold": tuned.threshold,
                                 "recipe": tuned.encoder.recipe.to_dict(),
                                 "test_overall": updates["random_split_test"]["overall"]}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
