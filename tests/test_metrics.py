"""inspector.metrics against the hand-rolled versions it replaced (frozen below as the reference):
the figures must come out identical, bit for bit, on random data with ties and one-class sets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from inspector.metrics import (binary_report, bootstrap_ci, recall_at_fpr, report_by_source, threshold_for_fpr,
                               threshold_for_rule)


# -- the implementation before scikit-learn's functions were used (issue #19), kept as the reference
def _ref_threshold_for_fpr(y, scores, fpr):
    neg = np.sort(np.asarray(scores)[np.asarray(y) == 0])[::-1]
    if len(neg) == 0:
        return 0.5
    k = int(np.floor(fpr * len(neg)))
    if k >= len(neg):
        return float(neg[-1])
    return float(np.nextafter(neg[k], np.inf))


def _ref_recall_at_fpr(y, scores, fpr):
    thr = _ref_threshold_for_fpr(y, scores, fpr)
    return float((scores[y == 1] >= thr).mean()) if (y == 1).any() else float("nan")


def _ref_binary_report(y, scores, threshold):
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    pred = s >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out = {"n": int(len(y)), "positives": n_pos, "negatives": n_neg, "threshold": float(threshold)}
    if n_pos and n_neg:
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["pr_auc"] = float(average_precision_score(y, s))
        out["recall_at_1pct_fpr"] = _ref_recall_at_fpr(y, s, 0.01)
        out["recall_at_5pct_fpr"] = _ref_recall_at_fpr(y, s, 0.05)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos if n_pos else float("nan")
    out["precision"] = float(precision)
    out["recall"] = float(recall)
    out["f1"] = float(2 * precision * recall / (precision + recall)) if n_pos and precision + recall else 0.0
    out["benign_routed"] = float(fp / n_neg) if n_neg else float("nan")
    out["harmful_caught"] = out["recall"]
    return out


def _same(a, b) -> bool:
    """Equal dicts/floats, NaN equal to NaN, floats compared exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _cases(n_cases: int = 300):
    """Random label/score sets: continuous scores, heavy ties (rounded), tiny sets, one class,
    scores in and outside [0, 1]."""
    rng = np.random.default_rng(19)
    for i in range(n_cases):
        n = int(rng.choice([1, 2, 3, 5, 17, 60, 250, 1000]))
        y = (rng.random(n) < rng.choice([0.0, 0.05, 0.3, 0.5, 0.9, 1.0])).astype(int)
        s = rng.random(n) + 0.6 * y * rng.random()
        if i % 3 == 1:
            s = np.round(s, 1)  # ties, between and within classes
        if i % 7 == 2:
            s = s * 40 - 20  # logits, not probabilities
        yield y, s


THRESHOLDS = (0.0, 0.25, 0.5, 0.731, 1.0)
FPRS = (0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 0.999, 1.0)


def test_binary_report_identical_to_reference():
    for y, s in _cases():
        for thr in THRESHOLDS + (float(np.median(s)),):
            assert _same(binary_report(y, s, thr), _ref_binary_report(y, s, thr)), (y, s, thr)


def test_recall_and_threshold_at_fpr_identical_to_reference():
    for y, s in _cases():
        for fpr in FPRS:
            assert threshold_for_fpr(y, s, fpr) == _ref_threshold_for_fpr(y, s, fpr)
            assert _same(recall_at_fpr(y, s, fpr), _ref_recall_at_fpr(y, s, fpr)), (y, s, fpr)


def test_pooled_rule_is_threshold_for_fpr():
    for y, s in _cases(60):
        src = np.array(["a", "b", "c"])[np.arange(len(y)) % 3]
        for target in (0.01, 0.05, 0.2):
            assert threshold_for_rule(y, s, src, "pooled", target) == _ref_threshold_for_fpr(y, s, target)


def test_report_by_source_and_bootstrap_run_on_random_data():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    s = rng.random(400) + 0.3 * y
    src = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, 400)]
    rep = report_by_source(y, s, 0.7, src, pools={"ab": ["a", "b"]})
    assert _same(rep["overall"], _ref_binary_report(y, s, 0.7))
    for name in "abcd":
        assert _same(rep["by_source"][name], _ref_binary_report(y[src == name], s[src == name], 0.7))
    inside = np.isin(src, ["a", "b"])
    assert _same({k: v for k, v in rep["pools"]["ab"].items() if k != "sources"},
                 _ref_binary_report(y[inside], s[inside], 0.7))
    ci = bootstrap_ci(y, s, n_boot=50)
    assert ci["roc_auc"][0] <= ci["roc_auc"][1]


@pytest.mark.parametrize("y", [np.zeros(5, int), np.ones(5, int)])
def test_one_class_reports(y):
    s = np.linspace(0, 1, 5)
    assert _same(binary_report(y, s, 0.5), _ref_binary_report(y, s, 0.5))


def test_empty_and_odd_label_reports():
    empty = np.zeros(0)
    assert _same(binary_report(empty, empty, 0.5), _ref_binary_report(empty, empty, 0.5))
    s = np.linspace(0, 1, 9)
    for y in (np.full(9, 2), np.array([2, 0, 0, 2, 2, 0, 2, 2, 0]), np.arange(9) % 2 == 1):
        assert _same(binary_report(y, s, 0.5), _ref_binary_report(y, s, 0.5)), y
