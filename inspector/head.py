"""Calibrated linear head: logistic regression on pair embeddings, Platt-scaled on held-out data.

Stored as plain arrays (npz) so that loading a model never unpickles anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


class CalibratedLinearHead:
    """scikit-learn-style estimator: ``fit(X, y)``, ``predict_proba(X)``, ``decision_function(X)``.

    The logistic regression is fitted on training embeddings; the probabilities are then
    recalibrated with a one-feature logistic fit (Platt scaling) on a separate calibration split,
    because embeddings of the training rows are over-confident after fine-tuning.
    """

    def __init__(self, C: float = 1.0, class_weight: str | None = "balanced", max_iter: int = 2000,
                 random_state: int = 0):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, X_cal: np.ndarray | None = None,
            y_cal: np.ndarray | None = None) -> "CalibratedLinearHead":
        from sklearn.linear_model import LogisticRegression

        X, y = self._check(X, y)
        lr = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter,
                                random_state=self.random_state)
        lr.fit(X, y)
        self.coef_ = lr.coef_.ravel().astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        self.platt_a_, self.platt_b_ = 1.0, 0.0
        if X_cal is not None:
            X_cal, y_cal = self._check(X_cal, y_cal)
            self.calibrate(self.decision_function(X_cal), y_cal)
        return self

    def calibrate(self, decisions: np.ndarray, y: np.ndarray) -> "CalibratedLinearHead":
        """Platt scaling on held-out decision values (e.g. pooled over an answer's windows)."""
        from sklearn.linear_model import LogisticRegression

        decisions = np.asarray(decisions, dtype=np.float64).reshape(-1, 1)
        y = np.asarray(y).astype(int).ravel()
        platt = LogisticRegression(C=1e6, max_iter=self.max_iter)
        platt.fit(decisions, y)
        self.platt_a_ = float(platt.coef_[0, 0])
        self.platt_b_ = float(platt.intercept_[0])
        if self.platt_a_ <= 0:
            raise ValueError("calibration reversed the score order: the head ranks held-out pairs "
                             "no better than chance; check the labels and the training data")
        return self

    def _check(self, X, y):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(int).ravel()
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"expected X of shape (n, d) and y of length n, got {X.shape} and {y.shape}")
        if set(np.unique(y)) != {0, 1}:
            raise ValueError(f"labels must contain both 0 and 1, got {sorted(set(np.unique(y)))}")
        return X, y

    def _require_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("this head is not fitted yet: call fit(X, y) or CalibratedLinearHead.load(path)")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        self._require_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.coef_.shape[0]:
            raise ValueError(f"expected features of width {self.coef_.shape[0]}, got shape {X.shape}")
        return X @ self.coef_ + self.intercept_

    def calibrated(self, decisions: np.ndarray) -> np.ndarray:
        """P(label=1) from decision values."""
        return _sigmoid(self.platt_a_ * np.asarray(decisions, dtype=np.float64) + self.platt_b_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = self.calibrated(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def save(self, path: str | Path) -> None:
        self._require_fitted()
        np.savez(path, coef=self.coef_, intercept=np.float64(self.intercept_),
                 platt=np.array([self.platt_a_, self.platt_b_]), C=np.float64(self.C))

    @classmethod
    def load(cls, path: str | Path) -> "CalibratedLinearHead":
        with np.load(path, allow_pickle=False) as f:
            head = cls(C=float(f["C"]))
            head.coef_ = f["coef"].astype(np.float64)
            head.intercept_ = float(f["intercept"])
            head.platt_a_, head.platt_b_ = (float(v) for v in f["platt"])
        return head


class EnsembleHead:
    """One ``CalibratedLinearHead`` per ensemble member, each on its own slice of the features
    (the encoder concatenates its members' embeddings). ``decision_function`` gives one column a
    member, so that each member's decisions are pooled over an answer's windows separately;
    ``calibrated`` averages the members' calibrated probabilities (a score ensemble: averaging
    several adapters' judgements cancels much of one adapter's seed-to-seed variance)."""

    def __init__(self, members: int, C: float = 1.0, **head_kw):
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}; use CalibratedLinearHead")
        self.members = members
        self.C = C
        self.heads = [CalibratedLinearHead(C=C, **head_kw) for _ in range(members)]

    def _slices(self, X: np.ndarray) -> list[np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] % self.members:
            raise ValueError(f"expected features of shape (n, {self.members} x member width), got {X.shape}")
        return np.split(X, self.members, axis=1)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "EnsembleHead":
        for head, part in zip(self.heads, self._slices(X)):
            head.fit(part, y)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return np.column_stack([h.decision_function(p) for h, p in zip(self.heads, self._slices(X))])

    def calibrate(self, decisions: np.ndarray, y: np.ndarray) -> "EnsembleHead":
        decisions = np.asarray(decisions, dtype=np.float64)
        if decisions.ndim != 2 or decisions.shape[1] != self.members:
            raise ValueError(f"expected decisions of shape (n, {self.members}), got {decisions.shape}")
        for k, head in enumerate(self.heads):
            head.calibrate(decisions[:, k], y)
        return self

    def calibrated(self, decisions: np.ndarray) -> np.ndarray:
        decisions = np.asarray(decisions, dtype=np.float64)
        return np.mean([h.calibrated(decisions[:, k]) for k, h in enumerate(self.heads)], axis=0)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = self.calibrated(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def save(self, path: str | Path) -> None:
        for h in self.heads:
            h._require_fitted()
        np.savez(path, coef=np.stack([h.coef_ for h in self.heads]),
                 intercept=np.array([h.intercept_ for h in self.heads]),
                 platt=np.array([[h.platt_a_, h.platt_b_] for h in self.heads]), C=np.float64(self.C))

    @classmethod
    def from_arrays(cls, f) -> "EnsembleHead":
        ens = cls(members=len(f["coef"]), C=float(f["C"]))
        for k, head in enumerate(ens.heads):
            head.coef_ = f["coef"][k].astype(np.float64)
            head.intercept_ = float(f["intercept"][k])
            head.platt_a_, head.platt_b_ = (float(v) for v in f["platt"][k])
        return ens


def make_head(members: int = 1):
    """The head for an encoder with this many ensemble members."""
    return CalibratedLinearHead() if members == 1 else EnsembleHead(members)


def load_head(path: str | Path):
    """A head saved by either class (a member per row of ``coef`` for an ensemble)."""
    with np.load(path, allow_pickle=False) as f:
        if f["coef"].ndim == 2:
            return EnsembleHead.from_arrays(f)
    return CalibratedLinearHead.load(path)
