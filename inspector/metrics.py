"""Metrics that matter for a router: ranking quality, and what a threshold costs and catches."""
from __future__ import annotations

import numpy as np


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Share of misaligned pairs caught when at most ``fpr`` of aligned pairs are routed: the recall
    at the threshold ``threshold_for_fpr`` sets, so the figure is what the threshold rule delivers
    (``roc_curve``'s best TPR at FPR <= ``fpr`` differs without aligned pairs and at ``fpr`` = 1)."""
    thr = threshold_for_fpr(y, scores, fpr)
    return float((scores[y == 1] >= thr).mean()) if (y == 1).any() else float("nan")


def threshold_for_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Lowest threshold whose share of aligned pairs at or above it is <= ``fpr``."""
    neg = np.sort(np.asarray(scores)[np.asarray(y) == 0])[::-1]
    if len(neg) == 0:
        return 0.5
    k = int(np.floor(fpr * len(neg)))  # number of negatives we may route
    if k >= len(neg):
        return float(neg[-1])
    # route strictly above the (k+1)-th highest negative score
    return float(np.nextafter(neg[k], np.inf))


def threshold_for_rule(y: np.ndarray, scores: np.ndarray, sources: np.ndarray, rule: str,
                       target: float) -> float:
    """The lowest threshold whose routed share of aligned calibration pairs is <= ``target``:
    pooled over all pairs ("pooled"), or as the mean over sources, each source weighing the same
    ("balanced"), so a large source of easy negatives cannot hide a small hard one."""
    neg = np.asarray(y) == 0
    s, src = np.asarray(scores, dtype=float)[neg], np.asarray(sources)[neg]
    if len(s) == 0:
        return 0.5
    if rule == "pooled":
        return threshold_for_fpr(y, scores, target)
    if rule != "balanced":
        raise ValueError(f"threshold rule must be 'pooled' or 'balanced', got {rule!r}")
    names, inv, counts = np.unique(src, return_inverse=True, return_counts=True)
    w = 1.0 / (counts[inv] * len(names))  # every source's aligned pairs weigh 1 / (number of sources)
    order = np.argsort(-s, kind="stable")
    s, w = s[order], w[order]
    routed = np.cumsum(w)  # share routed when the threshold sits at s[i] (ties: counted together below)
    ok = routed <= target + 1e-12
    # the first score whose inclusion would exceed the target: the threshold sits just above it
    k = int(np.argmin(ok)) if not ok.all() else len(s)
    if k >= len(s):
        return float(s[-1])
    return float(np.nextafter(s[k], np.inf))


def binary_report(y, scores, threshold: float) -> dict:
    """ROC-AUC, PR-AUC, P/R/F1 and routed shares at ``threshold``, recall at 1% and 5% FPR."""
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel()) \
        if np.isin(y, (0, 1)).any() else (0, 0, 0, 0)  # sklearn refuses a set without either label
    n_pos, n_neg = tp + fn, tn + fp
    out = {"n": int(len(y)), "positives": n_pos, "negatives": n_neg, "threshold": float(threshold)}
    if n_pos and n_neg:
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["pr_auc"] = float(average_precision_score(y, s))
        out["recall_at_1pct_fpr"] = recall_at_fpr(y, s, 0.01)
        out["recall_at_5pct_fpr"] = recall_at_fpr(y, s, 0.05)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos if n_pos else float("nan")
    out["precision"] = float(precision)
    out["recall"] = float(recall)
    out["f1"] = float(2 * precision * recall / (precision + recall)) if n_pos and precision + recall else 0.0
    # "benign routed" is the alignment tax: aligned answers sent to the aligner anyway
    out["benign_routed"] = float(fp / n_neg) if n_neg else float("nan")
    out["harmful_caught"] = out["recall"]
    return out


def bootstrap_ci(y, scores, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap intervals of ROC-AUC and recall at 1% / 5% FPR: how far a figure could
    move on another test set of the same size (aligned and misaligned pairs resampled separately,
    so every resample keeps the class counts). Compare two models only beyond these widths."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg):
        raise ValueError("bootstrap intervals need both aligned and misaligned pairs")
    rng = np.random.default_rng(seed)
    draws = {"roc_auc": [], "recall_at_1pct_fpr": [], "recall_at_5pct_fpr": []}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        yb, sb = y[idx], s[idx]
        draws["roc_auc"].append(roc_auc_score(yb, sb))
        draws["recall_at_1pct_fpr"].append(recall_at_fpr(yb, sb, 0.01))
        draws["recall_at_5pct_fpr"].append(recall_at_fpr(yb, sb, 0.05))
    tail = 100 * (1 - level) / 2
    return {"level": level, "n_boot": n_boot,
            **{k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for k, v in draws.items()}}


def report_by_source(y, scores, threshold: float, sources, pools: dict | None = None) -> dict:
    """``binary_report`` overall and per source (a source with one class reports its routed share);
    ``pools`` ({name: [source, ...]}) adds pooled reports over groups of sources."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    out = {"overall": binary_report(y, s, threshold)}
    if sources is not None:
        src = np.asarray(sources).astype(str)
        out["by_source"] = {name: binary_report(y[src == name], s[src == name], threshold)
                            for name in sorted(set(src))}
        for name, members in (pools or {}).items():
            inside = np.isin(src, list(members))
            out.setdefault("pools", {})[name] = {"sources": sorted(members),
                                                 **binary_report(y[inside], s[inside], threshold)}
    return out


def clean_json(obj):
    """NaN (e.g. recall on a source with no misaligned pairs) becomes null: valid JSON."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
