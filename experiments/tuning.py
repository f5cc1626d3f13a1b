"""Threshold tuning: the logic behind ``experiments/threshold_tuning.ipynb``, kept in a module so
it is tested and reusable (the notebook only sets parameters, calls these and shows the results).

A threshold trades two things: the **recall** on misaligned pairs (share caught and corrected)
and the **alignment tax** (share of benign traffic still sent to the aligner, paying a
generation for nothing). ``threshold_curve`` tabulates both for every useful threshold,
``choose_threshold`` picks one by a target, ``cost_per_1000`` prices each, and
``write_tuned_inspector`` saves an inspector copy that carries the choice.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from inspector.metrics import binary_report, clean_json, threshold_for_fpr
from pipeline.tables import extract_pair, is_missing, parse_label, present, read_table, shown

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PAIRS = REPO_ROOT / "examples" / "labelled_pairs.jsonl"
SHARED_PAIRS = REPO_ROOT.parent / "shared" / "data" / "labeled_pairs.jsonl"
TARGET_RE = re.compile(r"^\s*(recall\s*>=|benign_routed\s*<=)\s*([0-9]*\.?[0-9]+)\s*$")


# ------------------------------------------------------------------------------------ loading
def load_scored(path: str | Path, inspector=None, max_rows: int | None = None, seed: int = 0,
                label_col: str = "label", query_col: str = "query", answer_col: str = "answer",
                show_progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Labelled pairs with an ``inspector_score``: from the file when it has one (output of
    ``pipeline.batch`` or ``inspector.evaluate --scores-out``), else scored here by ``inspector``
    (an ``Inspector``, a loader returning one, a folder, or None for the default one).

    Returns (frame with query, answer, label, source, inspector_score; notes on what was done).
    Rows the batch job could not score (``error`` set) are left out and counted; ``max_rows``
    keeps a label-stratified random sample, so a large file tunes in seconds.
    """
    path = Path(path)
    df = read_table(path)
    if max_rows is not None and (isinstance(max_rows, bool) or max_rows < 1):
        raise ValueError(f"max_rows must be a number of rows >= 1 (or None for all), got {max_rows!r}")
    df.index = pd.RangeIndex(1, len(df) + 1)  # the file's row numbers, kept through filtering for errors
    notes: dict = {"data": str(path), "rows_in_file": int(len(df))}
    if label_col not in df.columns:
        raise ValueError(f"{path}: no {label_col!r} column; tuning needs labels (1 = misaligned, 0 = aligned)")
    if "error" in df.columns:
        bad = df["error"].notna() & (df["error"].astype(str) != "")
        notes["rows_with_errors_left_out"] = int(bad.sum())
        df = df[~bad]
    labels = []
    for n, v in zip(df.index, df[label_col].tolist()):
        try:
            labels.append(parse_label(v))
        except ValueError:
            raise ValueError(f"{path}: row {n}: {label_col!r} must be 0 or 1, got {shown(v)}") from None
    df = df.assign(label=np.asarray(labels, dtype=int))
    if max_rows and len(df) > max_rows:
        frac = max_rows / len(df)
        keep = [g.sample(n=max(1, round(len(g) * frac)), random_state=seed).index
                for _, g in df.groupby("label")]
        df = df.loc[sorted(np.concatenate(keep))]
        notes["sampled_rows"] = int(len(df))
    pairs = []
    for n, row in zip(df.index, df.to_dict("records")):
        try:
            pairs.append(extract_pair(present(row), query_col, answer_col))
        except ValueError as e:
            raise ValueError(f"{path}: row {n}: {e}") from None
    df = df.assign(query=[q for q, _ in pairs], answer=[a for _, a in pairs])
    if "source" not in df.columns:
        df = df.assign(source=path.stem)
    blank = df["source"].map(lambda v: is_missing(v) or not str(v).strip())  # a CSV's empty cell too
    df["source"] = df["source"].astype(object).where(~blank, path.stem).astype(str)
    if "inspector_score" in df.columns:
        # the file's scores are the model being tuned: one missing or impossible score is an error,
        # never a silent re-scoring of every row by another inspector
        scores = pd.to_numeric(df["inspector_score"], errors="coerce")
        bad = ~scores.between(0.0, 1.0)  # NaN, inf and text included
        if bad.any():
            n = df.index[int(np.flatnonzero(bad.to_numpy())[0])]
            raise ValueError(f"{path}: row {n}: 'inspector_score' must be a probability in [0, 1], got "
                             f"{shown(df.loc[n, 'inspector_score'])} ({int(bad.sum())} such row(s)); "
                             f"rescore the file, or drop the column to score it here")
        df["inspector_score"] = scores.astype(float)
        notes["scores"] = "read from the file"
    else:
        insp = _as_inspector(inspector)
        df["inspector_score"] = insp.score(df["query"].tolist(), df["answer"].tolist(),
                                           show_progress=show_progress)
        notes["scores"] = "computed here"
    notes.update(rows=int(len(df)), misaligned=int(df["label"].sum()),
                 aligned=int((df["label"] == 0).sum()))
    if notes["misaligned"] == 0 or notes["aligned"] == 0:
        raise ValueError(f"{path}: tuning needs both labels; got {notes['misaligned']} misaligned "
                         f"and {notes['aligned']} aligned rows")
    return df[["query", "answer", "label", "source", "inspector_score"]].reset_index(drop=True), notes


def _as_inspector(inspector):
    """An ``Inspector``, a zero-argument loader returning one, or a folder (None: the default)."""
    from inspector import Inspector

    if isinstance(inspector, Inspector):
        return inspector
    if callable(inspector):
        return inspector()
    return Inspector.load(inspector)


# ------------------------------------------------------------------------------------ curves
def threshold_curve(y, scores) -> pd.DataFrame:
    """One row per distinct score used as threshold (route iff score >= threshold), from the
    lowest (everything routed) up; plus a threshold above every score (nothing routed). The rates
    are scikit-learn's ``roc_curve`` and ``precision_recall_curve`` at every threshold (no
    intermediate point dropped); ``y`` needs both labels."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"a threshold curve needs both labels (1 = misaligned, 0 = aligned), got {sorted(set(y))}")
    fpr, tpr, cuts = roc_curve(y, s, drop_intermediate=False)  # thresholds falling, from +inf
    precision, _, _ = precision_recall_curve(y, s, drop_intermediate=False)  # rising, + "nothing routed"
    fpr, tpr, cuts = fpr[::-1], tpr[::-1], cuts[::-1].copy()
    cuts[-1] = np.nextafter(s.max(), np.inf)  # above every score: a finite threshold that routes nothing
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    routed = (np.rint(tpr * pos) + np.rint(fpr * neg)) / len(s)
    return pd.DataFrame({"threshold": cuts, "recall": tpr, "benign_routed": fpr,
                         "precision": precision, "routed": routed})


def parse_target(target: str) -> tuple[str, float]:
    """``"recall>=0.9"`` or ``"benign_routed<=0.05"`` -> (name, value)."""
    m = TARGET_RE.match(str(target))
    if not m:
        raise ValueError(f"target {target!r}: expected 'recall>=X' or 'benign_routed<=Y' with X, Y in [0, 1]")
    name, value = m.group(1).split()[0].rstrip("<=>"), float(m.group(2))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"target {target!r}: the value must be a share in [0, 1]")
    return name, value


def choose_threshold(y, scores, target: str) -> float:
    """The threshold meeting ``target`` at the least cost of the other side:

    * ``recall>=X``: the highest threshold that still catches a share X of misaligned pairs
      (so the fewest benign pairs are routed for that recall);
    * ``benign_routed<=Y``: the lowest threshold routing at most a share Y of aligned pairs
      (so the most misaligned pairs are caught within that tax), as ``inspector.metrics`` does.
    """
    name, value = parse_target(target)
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    if name == "benign_routed":
        return float(threshold_for_fpr(y, s, value))
    pos = np.sort(s[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no misaligned pairs: recall is undefined")
    k = max(1, math.ceil(value * len(pos) - 1e-9))  # positives that must score >= threshold
    return float(pos[k - 1])


def cost_per_1000(curve: pd.DataFrame, inspector_cost: float, aligner_cost: float,
                  misaligned_share: float, miss_cost: float = 0.0) -> pd.DataFrame:
    """Expected cost of 1,000 requests at each threshold of ``curve``: every request pays the
    inspector, routed ones also pay the aligner, and (optionally) each misaligned answer let
    through costs ``miss_cost``. ``misaligned_share`` is the share of misaligned answers in the
    traffic you price (production traffic is usually far cleaner than a labelled set)."""
    p = float(misaligned_share)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"misaligned_share must be in [0, 1], got {p}")
    for name, cost in (("inspector_cost", inspector_cost), ("aligner_cost", aligner_cost), ("miss_cost", miss_cost)):
        if not math.isfinite(float(cost)) or float(cost) < 0:
            raise ValueError(f"{name} must be a finite cost >= 0, got {cost}")
    routed = p * curve["recall"] + (1 - p) * curve["benign_routed"]
    out = curve.copy()
    out["routed_traffic"] = routed
    out["aligner_spend"] = 1000 * routed * aligner_cost
    out["inspector_spend"] = 1000 * inspector_cost
    out["miss_spend"] = 1000 * p * (1 - curve["recall"]) * miss_cost
    out["cost_per_1000"] = out["inspector_spend"] + out["aligner_spend"] + out["miss_spend"]
    return out


# ------------------------------------------------------------------------------------ plots
def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib; install it with "
                          "pip install 'aligner-inspector-pipeline[experiments]'") from e

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_roc_pr(y, scores, threshold: float, out: str | Path | None = None, title: str = ""):
    """ROC and precision-recall curves, with the chosen operating point marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _plt()
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    at = binary_report(y, s, threshold)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    fpr, tpr, _ = roc_curve(y, s)
    a.plot(fpr, tpr, lw=2, label=f"inspector (AUC {roc_auc_score(y, s):.3f})")
    a.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    a.scatter([at["benign_routed"]], [at["recall"]], c="crimson", zorder=5, s=50,
              label=f"threshold {threshold:.3f}")
    a.set(xlabel="false-positive rate (benign routed)", ylabel="true-positive rate (recall)",
          title="ROC", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    a.legend(loc="lower right", fontsize=8)
    prec, rec, _ = precision_recall_curve(y, s)
    b.plot(rec, prec, lw=2, label=f"inspector (AP {average_precision_score(y, s):.3f})")
    b.axhline(y.mean(), ls="--", c="grey", lw=1, label=f"chance ({y.mean():.2f})")
    b.scatter([at["recall"]], [at["precision"]], c="crimson", zorder=5, s=50, label=f"threshold {threshold:.3f}")
    b.set(xlabel="recall (misaligned caught)", ylabel="precision (routed that were misaligned)",
          title="Precision-recall", xlim=(-0.01, 1.01), ylim=(0, 1.02))
    b.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_tax_curve(curve: pd.DataFrame, threshold: float, target: str | None = None,
                   out: str | Path | None = None):
    """The alignment tax (benign traffic routed) against recall on misaligned pairs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    c = curve.sort_values(["recall", "benign_routed"])
    ax.step(100 * c["recall"], 100 * c["benign_routed"], where="post", lw=2, label="inspector")
    ax.plot([0, 100], [0, 100], ls="--", c="grey", lw=1, label="random routing")
    row = curve.iloc[(curve["threshold"] - threshold).abs().argmin()]
    ax.scatter([100 * row["recall"]], [100 * row["benign_routed"]], c="crimson", s=60, zorder=5,
               label=f"threshold {threshold:.3f}: recall {row['recall']:.0%}, tax {row['benign_routed']:.1%}")
    if target:
        name, value = parse_target(target)
        (ax.axvline if name == "recall" else ax.axhline)(100 * value, c="crimson", ls=":", lw=1,
                                                         label=f"target {target}")
    ax.set(xlabel="recall on misaligned pairs (%)", ylabel="benign traffic routed to the aligner (%)",
           title="Alignment tax vs. recall", xlim=(-1, 101), ylim=(-1, 101))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)


def plot_cost(costs: pd.DataFrame, threshold: float, aligner_cost: float, unit: str = "$",
              out: str | Path | None = None):
    """Expected cost per 1,000 requests by threshold, beside an always-on aligner."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    c = costs[costs["threshold"] <= 1.0]
    if len(c) and c["threshold"].iloc[-1] < 1.0:  # above every score nothing is routed: run the line to 1
        c = pd.concat([c, costs.iloc[[-1]].assign(threshold=1.0)], ignore_index=True)
    ax.step(c["threshold"], c["cost_per_1000"], where="post", lw=2, label="inspector + aligner (+ misses)")
    ax.step(c["threshold"], c["aligner_spend"], where="post", lw=1, ls="--", label="of which aligner")
    if c["miss_spend"].any():
        ax.step(c["threshold"], c["miss_spend"], where="post", lw=1, ls=":", label="of which misses")
    ax.axhline(1000 * aligner_cost, c="grey", ls="-.", lw=1, label="aligner on every answer")
    row = costs.iloc[(costs["threshold"] - threshold).abs().argmin()]
    ax.scatter([threshold], [row["cost_per_1000"]], c="crimson", s=60, zorder=5,
               label=f"threshold {threshold:.3f}: {unit}{row['cost_per_1000']:.4g} / 1k")
    ax.set(xlabel="threshold (route iff score >= threshold)", ylabel=f"expected cost per 1,000 requests ({unit})",
           title="Cost per 1,000 requests", xlim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out):
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    return fig


# ------------------------------------------------------------------------------------ writing
def write_tuned_inspector(inspector, threshold: float, out_dir: str | Path, record: dict) -> Path:
    """Save a copy of ``inspector`` whose stored threshold is ``threshold``; ``config.json`` also
    keeps how it was chosen. ``pipeline.batch --inspector`` and the server load it as is."""
    insp = _as_inspector(inspector).with_threshold(threshold)
    insp.config["threshold_rule"] = f"experiments/threshold_tuning.ipynb: {record.get('target')}"
    insp.config["threshold_tuning"] = clean_json(record)
    return insp.save(out_dir)


def summary_record(y, scores, threshold: float, target: str, notes: dict, costs: pd.DataFrame | None = None,
                   extra: dict | None = None) -> dict:
    """What the notebook writes to ``threshold_choice.json`` and into the inspector's config."""
    at = binary_report(y, scores, threshold)
    rec = {"target": target, "threshold": float(threshold), "data": notes, "at_threshold": at}
    if costs is not None:
        row = costs.iloc[(costs["threshold"] - threshold).abs().argmin()]
        rec["cost_per_1000"] = float(row["cost_per_1000"])
        rec["routed_traffic"] = float(row["routed_traffic"])
    rec.update(extra or {})
    return clean_json(rec)


def write_json(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_json(obj), indent=2) + "\n")
    return path
