"""Evaluation report for the inspector and the aligner, as Markdown with PNG plots:

    python -m experiments.report --inspector DIR --data FILE [FILE ...] [--aligner-eval FILE] --out DIR

``--data``: labelled pairs (``query``/``answer`` or ``messages``, ``label``, optional ``source``);
files that already hold an ``inspector_score`` (from ``pipeline.batch`` or ``inspector.evaluate
--scores-out``) are used as scored, the others are scored with ``--inspector``.
``--aligner-eval``: the JSON written by ``python -m aligner.evaluate --out``, or the rows written by
``python -m pipeline.batch LABELLED --aligner MODEL --out rows.jsonl`` (per-row outcomes, so the
report can show confusion matrices and the worst corrections). Without it the report says so.

Writes ``DIR/report.md``, its PNGs and ``DIR/report.json`` (the same figures, for machines).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from inspector.metrics import binary_report, clean_json, report_by_source
from pipeline.tables import extract_pair, is_missing, present, read_table

from . import tuning

METRIC_COLS = ["n", "positives", "negatives", "roc_auc", "pr_auc", "precision", "recall",
               "benign_routed", "f1", "recall_at_5pct_fpr"]
ALIGNER_OUTCOMES = ["passes re-inspection", "still flagged", "fallback"]
ALIGNER_JSON_MEANING = {
    "n_rows": "rows evaluated",
    "harmful_corrected_pass_rate": "harmful answers whose correction the inspector then passes",
    "harmful_original_pass_rate": "harmful answers the inspector passed before correction",
    "benign_kept_rate": "benign answers kept (correction close to the original)",
    "benign_corrected_pass_rate": "benign answers whose correction the inspector passes",
    "degenerate_rate": "outputs unusable (empty, repetitive)",
    "length_ratio_median": "median length of correction / original",
}


# ------------------------------------------------------------------------------------ helpers
def stored_threshold(inspector_dir: str | None) -> float:
    """The threshold an inspector folder stores, read from its config (no model load)."""
    from inspector import DEFAULT_MODEL_DIR

    path = inspector_dir or os.environ.get("INSPECTOR_MODEL") or None
    cfg = (Path(path) if path else DEFAULT_MODEL_DIR) / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{cfg} not found: expected an inspector folder (or pass --threshold)")
    return float(json.loads(cfg.read_text())["threshold"])


def short(text, n: int = 160) -> str:
    """One Markdown-table-safe line of at most ``n`` characters."""
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= n else t[: n - 1] + "…"


def md_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table (no extra dependency such as tabulate)."""
    def cell(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "–"
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}f}"
        if isinstance(v, (np.integer,)):
            return str(int(v))
        return str(v)

    def whole(col):  # a column of counts prints as integers, even when pandas made it float
        vals = [v for v in df[col].tolist() if isinstance(v, (int, float, np.number)) and not
                (isinstance(v, float) and np.isnan(v))]
        return bool(vals) and all(float(v).is_integer() for v in vals) and df[col].name not in (
            "roc_auc", "pr_auc", "precision", "recall", "benign_routed", "f1", "recall_at_5pct_fpr")

    ints = {c for c in df.columns if whole(c)}
    cols = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        vals = [str(int(v)) if c in ints and isinstance(v, (int, float, np.number)) and not np.isnan(v)
                else cell(v) for c, v in row.items()]
        lines.append("| " + " | ".join([str(idx)] + vals) + " |")
    return "\n".join(lines)


def _plt():
    return tuning._plt()


def plot_matrices(mats: dict[str, np.ndarray], rows: list[str], cols: list[str], out: Path,
                  title: str, xlabel: str = "", ylabel: str = "actual") -> Path:
    """Count matrices side by side, each cell with its count and its share of the row; per-source
    panels only when there is more than one source (else they repeat "overall")."""
    plt = _plt()
    if len(mats) == 2:
        mats = {"overall": mats["overall"]}
    n = len(mats)
    per_row = min(n, 3)
    nrows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(nrows, per_row, figsize=(1.6 + 1.5 * len(cols) * per_row, 0.6 + 1.5 * len(rows) * nrows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, mats.items()):
        m = np.asarray(m, dtype=float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{int(m[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                        color="white" if share[i, j] > 0.6 else "black", fontsize=9)
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_calibration(y, s, out: Path, n_bins: int = 10) -> tuple[Path, float]:
    """Reliability diagram (predicted P(misaligned) vs. observed share) over a score histogram;
    returns the path and the expected calibration error (bin-weighted |observed - predicted|)."""
    from sklearn.calibration import calibration_curve

    plt = _plt()
    y, s = np.asarray(y).astype(int), np.asarray(s, dtype=float)
    bins = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(s, bins[1:-1]), 0, n_bins - 1)
    ece = float(sum(abs(y[which == b].mean() - s[which == b].mean()) * (which == b).mean()
                    for b in range(n_bins) if (which == b).any()))
    frac, mean_pred = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    a.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    a.plot(mean_pred, frac, marker="o", lw=2, label=f"inspector (ECE {ece:.3f})")
    a.set(ylabel="observed share misaligned", title="Calibration", ylim=(-0.02, 1.02))
    a.legend(loc="upper left", fontsize=8)
    b.hist([s[y == 0], s[y == 1]], bins=bins, label=["aligned", "misaligned"], color=["tab:blue", "tab:red"],
           alpha=0.8)
    b.set(xlabel="inspector score P(misaligned)", ylabel="pairs", xlim=(0, 1))
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, ece


def plot_recall_by_source(y, s, sources, threshold: float, out: Path, max_routed: float = 0.2) -> Path:
    """Recall against the share of aligned pairs routed, overall and per source, on the low-tax end
    (up to ``max_routed``, further if a threshold point lies beyond) where a router operates; each
    source's point at ``threshold`` is marked.
    Sources with one label only have no curve: their routed share is listed instead."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    y, s, sources = np.asarray(y).astype(int), np.asarray(s, dtype=float), np.asarray(sources).astype(str)
    groups = {"overall": np.ones(len(y), bool), **{name: sources == name for name in sorted(set(sources))}}
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    one_label, right = [], 100 * max_routed
    for i, (name, m) in enumerate(groups.items()):
        yi, si = y[m], s[m]
        at = binary_report(yi, si, threshold)
        if len(set(yi)) < 2:
            one_label.append(f"{name}: {at['benign_routed']:.1%} routed" if (yi == 0).all()
                             else f"{name}: {at['recall']:.0%} caught")
            continue
        fpr, tpr, _ = roc_curve(yi, si)
        overall = name == "overall"
        line, = ax.step(100 * fpr, 100 * tpr, where="post", lw=3 if overall else 1.6,
                        c="black" if overall else f"C{i % 10}",
                        label=f"{name} ({at['positives']} misaligned / {at['negatives']} aligned)")
        ax.scatter([100 * at["benign_routed"]], [100 * at["recall"]], color=line.get_color(), s=45, zorder=5,
                   edgecolor="white")
        right = max(right, min(100.0, 100 * at["benign_routed"] * 1.1 + 1))  # every dot stays in view
    ax.axvline(5, c="grey", ls=":", lw=1)
    ax.set(xlabel="aligned pairs routed to the aligner (%)", ylabel="misaligned pairs caught (%)",
           title=f"Recall vs. benign routed by source (dots: threshold {threshold:.3f})",
           xlim=(0, right), ylim=(0, 101))
    ax.legend(fontsize=7, loc="lower right")
    if one_label:
        ax.text(0.98, 0.25, "aligned-only sources at the threshold:\n" + "\n".join(one_label),
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgrey")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def confusion(y, pred) -> np.ndarray:
    """Rows: actual aligned / misaligned; columns: passed / routed."""
    from sklearn.metrics import confusion_matrix

    if len(y) == 0:  # scikit-learn refuses empty input
        return np.zeros((2, 2), dtype=np.int64)
    return confusion_matrix(np.asarray(y).astype(int), np.asarray(pred).astype(int), labels=[0, 1])


# ------------------------------------------------------------------------------------ inspector
def inspector_section(df: pd.DataFrame, threshold: float, out: Path, worst: int) -> tuple[list[str], dict]:
    y, s, src = df["label"].to_numpy(), df["inspector_score"].to_numpy(), df["source"].to_numpy()
    rep = report_by_source(y, s, threshold, src)
    table = pd.DataFrame({"overall": rep["overall"], **rep["by_source"]}).T.reindex(columns=METRIC_COLS)
    table.index.name = "source"
    tuning.plot_roc_pr(y, s, threshold, out / "inspector_roc_pr.png",
                       title=f"{len(df)} pairs, threshold {threshold:.3f}")
    _plt().close("all")
    _, ece = plot_calibration(y, s, out / "inspector_calibration.png")
    plot_recall_by_source(y, s, src, threshold, out / "inspector_recall_by_source.png")
    mats = {"overall": confusion(y, s >= threshold)}
    for name in sorted(set(src)):
        m = src == name
        mats[name] = confusion(y[m], s[m] >= threshold)
    plot_matrices(mats, ["aligned", "misaligned"], ["passed", "routed"], out / "inspector_confusion.png",
                  f"Inspector at threshold {threshold:.3f} (count, share of the row)", xlabel="inspector decision")
    fn = df[(df["label"] == 1) & (df["inspector_score"] < threshold)].nsmallest(worst, "inspector_score")
    fp = df[(df["label"] == 0) & (df["inspector_score"] >= threshold)].nlargest(worst, "inspector_score")
    lines = [
        "## Inspector", "",
        f"Threshold **{threshold:.4f}** (route iff score ≥ threshold). `benign_routed` is the alignment "
        f"tax: the share of aligned answers sent to the aligner anyway. Expected calibration error {ece:.3f}.", "",
        md_table(table), "",
        "![ROC and precision-recall](inspector_roc_pr.png)", "",
        "![Recall vs. benign routed by source](inspector_recall_by_source.png)", "",
        "![Calibration](inspector_calibration.png)", "",
        "![Confusion matrices](inspector_confusion.png)", "",
        f"### Worst misses (misaligned, lowest scores; {len(fn)} of "
        f"{int(((df['label'] == 1) & (df['inspector_score'] < threshold)).sum())})", "",
        _examples(fn, ["source", "inspector_score", "query", "answer"]), "",
        f"### Worst false alarms (aligned, highest scores; {len(fp)} of "
        f"{int(((df['label'] == 0) & (df['inspector_score'] >= threshold)).sum())})", "",
        _examples(fp, ["source", "inspector_score", "query", "answer"]), "",
    ]
    figures = {"threshold": threshold, "calibration_ece": ece, **rep,
               "confusion": {k: v.tolist() for k, v in mats.items()},
               "worst_misses": fn[["source", "inspector_score", "query", "answer"]].to_dict("records"),
               "worst_false_alarms": fp[["source", "inspector_score", "query", "answer"]].to_dict("records")}
    return lines, figures


def _examples(df: pd.DataFrame, cols: list[str], n: int = 160) -> str:
    if df.empty:
        return "_none_"
    view = pd.DataFrame({c: [short(v, n) if isinstance(v, str) else v for v in df[c]] for c in cols})
    view.index = range(1, len(view) + 1)
    view.index.name = "#"
    return md_table(view)


# ------------------------------------------------------------------------------------ aligner
def aligner_section(path: str | None, threshold: float, out: Path, worst: int) -> tuple[list[str], dict]:
    if not path:
        return ["## Aligner", "",
                "No aligner evaluated. Pass `--aligner-eval` with the JSON of "
                "`python -m aligner.evaluate --model M --data FILE --out eval.json`, or with the rows of "
                "`python -m pipeline.batch LABELLED.jsonl --aligner M --out rows.jsonl`.", ""], {"evaluated": False}
    p = Path(path)
    if p.suffix.lower() == ".json":
        return _aligner_from_json(p)
    return _aligner_from_rows(p, threshold, out, worst)


def _aligner_from_json(p: Path) -> tuple[list[str], dict]:
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg}); expected the output of aligner.evaluate") from None
    if not isinstance(data, dict) or "n_rows" not in data:
        raise ValueError(f"{p}: expected the JSON object written by `python -m aligner.evaluate --out`")
    rows = [(k, data[k], ALIGNER_JSON_MEANING.get(k, "")) for k in data
            if isinstance(data[k], (int, float, str)) or data[k] is None]
    table = pd.DataFrame(rows, columns=["figure", "value", "meaning"]).set_index("figure")
    lines = ["## Aligner", "", f"From `{p.name}` (`python -m aligner.evaluate`): aggregate figures only; "
             "pass the per-row output of `pipeline.batch --aligner` for confusion matrices and examples.", "",
             md_table(table, digits=4), ""]
    return lines, {"evaluated": True, "kind": "aligner.evaluate", **data}


def _aligner_from_rows(p: Path, threshold: float, out: Path, worst: int) -> tuple[list[str], dict]:
    df = read_table(p)
    df.index = pd.RangeIndex(1, len(df) + 1)  # the file's rows, for errors
    need = {"inspector_score", "flagged", "corrected_answer", "corrected_score", "fallback"}
    if not need <= set(df.columns):
        raise ValueError(f"{p}: missing {sorted(need - set(df.columns))}; expected the rows written by "
                         f"`python -m pipeline.batch ... --aligner MODEL`")
    rows_in_file, errors = len(df), 0
    if "error" in df.columns:
        has_error = df["error"].notna() & (df["error"].astype(str) != "")
        errors = int(has_error.sum())
        df = df[~has_error]
    routed = df[df["flagged"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))].copy()
    if routed.empty:
        return (["## Aligner", "", f"`{p.name}`: no row was routed to the aligner.", ""],
                {"evaluated": True, "routed": 0})
    pairs = []
    for n, r in zip(routed.index, routed.to_dict("records")):
        try:
            pairs.append(extract_pair(present(r)))
        except ValueError as e:
            raise ValueError(f"{p}: row {n}: {e}") from None
    routed["query"], routed["answer"] = [q for q, _ in pairs], [a for _, a in pairs]
    fb = routed["fallback"].notna() & (routed["fallback"].astype(str) != "")
    cs = pd.to_numeric(routed["corrected_score"], errors="coerce")
    routed["outcome"] = np.where(fb, "fallback", np.where(cs < threshold, "passes re-inspection", "still flagged"))
    routed["after"] = cs
    routed["truth"] = _truths(p, routed)
    if "source" not in routed.columns:
        routed["source"] = p.stem
    truths = [t for t in ("aligned", "misaligned", "flagged (no label)") if (routed["truth"] == t).any()]

    def matrix(frame):
        return np.array([[int(((frame["truth"] == t) & (frame["outcome"] == o)).sum()) for o in ALIGNER_OUTCOMES]
                         for t in truths])

    mats = {"overall": matrix(routed)}
    for name in sorted(routed["source"].astype(str).unique()):
        mats[name] = matrix(routed[routed["source"].astype(str) == name])
    plot_matrices(mats, truths, ["passes", "still flagged", "fallback"], out / "aligner_confusion.png",
                  f"Routed pairs after the aligner (re-inspected at {threshold:.3f})", xlabel="outcome")
    _plot_before_after(routed, threshold, out / "aligner_scores.png")

    # the rows the aligner should fix: the misaligned ones, or every routed row of an unlabelled file
    fix = "misaligned" if {"aligned", "misaligned"} & set(truths) else "flagged (no label)"

    def stats(frame):
        mis = frame[frame["truth"] == fix]
        ok = frame[frame["truth"] == "aligned"]
        return {"routed": len(frame),
                "misaligned_fixed": (mis["outcome"] == "passes re-inspection").mean() if len(mis) else np.nan,
                "fallback_rate": (frame["outcome"] == "fallback").mean(),
                "aligned_routed": len(ok),
                "aligned_unchanged": (ok["corrected_answer"].isna() & (ok["outcome"] != "fallback")).mean()
                if len(ok) else np.nan,
                "mean_score_before": frame["inspector_score"].astype(float).mean(),
                "mean_score_after": frame["after"].mean()}

    table = pd.DataFrame({"overall": stats(routed),
                          **{n: stats(routed[routed["source"].astype(str) == n])
                             for n in sorted(routed["source"].astype(str).unique())}}).T
    table.index.name = "source"
    bad = routed[(routed["truth"] == fix) & (routed["outcome"] == "still flagged")].nlargest(worst, "after")
    bad = bad.assign(correction=bad["corrected_answer"].fillna("(unchanged)"))
    touched = routed[(routed["truth"] == "aligned") & routed["corrected_answer"].notna()].nlargest(
        worst, "inspector_score").assign(correction=lambda d: d["corrected_answer"])
    cols = ["source", "inspector_score", "after", "query", "answer", "correction"]
    lines = [
        "## Aligner", "",
        f"From `{p.name}`: {len(routed)} routed pairs of {len(df)} scored rows"
        f"{f' ({errors} of the file rows had an error and were left out)' if errors else ''}"
        f". Each correction is re-scored by the "
        f"inspector; it *passes* below {threshold:.4f}. `fallback`: no usable correction (the pipeline's "
        f"fallback policy applied). `misaligned_fixed` is the share of misaligned routed answers whose "
        f"correction passes; `aligned_unchanged` the share of aligned routed answers left as they were.", "",
        md_table(table), "",
        "![Aligner outcomes](aligner_confusion.png)", "",
        "![Scores before and after correction](aligner_scores.png)", "",
        f"### Worst corrections (misaligned, correction still flagged; {len(bad)} shown)", "",
        _examples(bad, cols, 120), "",
        f"### Aligned answers the aligner rewrote ({len(touched)} shown)", "",
        _examples(touched, cols, 120), "",
    ]
    figures = {"evaluated": True, "kind": "rows", "routed": len(routed), "rows_in_file": rows_in_file,
               "rows_with_errors_left_out": errors,
               "by_source": clean_json(table.to_dict("index")),
               "confusion": {k: v.tolist() for k, v in mats.items()}, "outcomes": ALIGNER_OUTCOMES, "truths": truths}
    return lines, figures


def _truths(p: Path, routed: pd.DataFrame) -> np.ndarray:
    """Each routed row's label as a word; a row without a label is "flagged (no label)", never aligned."""
    if "label" not in routed.columns:
        return np.full(len(routed), "flagged (no label)", dtype=object)
    missing = routed["label"].map(is_missing) | (routed["label"].astype(str).str.strip() == "")
    labels = pd.to_numeric(routed["label"].where(~missing), errors="coerce")
    bad = ~missing & ~labels.isin([0, 1])
    if bad.any():
        n = routed.index[int(np.flatnonzero(bad.to_numpy())[0])]
        raise ValueError(f"{p}: row {n}: 'label' must be 0, 1 or empty, got {routed.loc[n, 'label']!r}")
    return np.where(missing, "flagged (no label)", np.where(labels == 1, "misaligned", "aligned"))


def _plot_before_after(routed: pd.DataFrame, threshold: float, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5))
    colours = {"misaligned": "tab:red", "aligned": "tab:blue", "flagged (no label)": "tab:purple"}
    for truth, g in routed[routed["after"].notna()].groupby("truth"):
        ax.scatter(g["inspector_score"].astype(float), g["after"], s=22, alpha=0.8, c=colours.get(truth), label=truth)
    ax.axhline(threshold, c="crimson", ls=":", lw=1, label=f"threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="score of the original answer", ylabel="score of the correction", xlim=(0, 1), ylim=(0, 1),
           title="Inspector score before and after correction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------ main
def build_report(data: list[str], out_dir: str | Path, inspector: str | None = None, threshold: float | None = None,
                 aligner_eval: str | None = None, max_rows: int | None = None, worst: int = 5,
                 command: str | None = None) -> Path:
    """Write ``out_dir/report.md`` (+ PNGs, ``report.json``); returns the Markdown path. The files are
    made in a staging folder and moved into ``out_dir`` only when all are done: a failure leaves
    ``out_dir`` as it was, never new figures beside an old report."""
    final = Path(out_dir)
    if aligner_eval is not None and not Path(aligner_eval).is_file():
        raise FileNotFoundError(f"--aligner-eval {aligner_eval}: no such file")
    created = not final.exists()
    final.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=".partial-", dir=final))  # same folder, same filesystem
    try:
        _build_report(data, out, inspector, threshold, aligner_eval, max_rows, worst, command)
        for f in out.iterdir():
            os.replace(f, final / f.name)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if created:
            shutil.rmtree(final, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    return final / "report.md"


def _build_report(data: list[str], out: Path, inspector: str | None, threshold: float | None,
                  aligner_eval: str | None, max_rows: int | None, worst: int, command: str | None) -> None:
    thr = float(threshold) if threshold is not None else stored_threshold(inspector)
    from functools import lru_cache

    @lru_cache(maxsize=1)
    def model():  # loaded once, and only if some file needs scoring
        from inspector import Inspector

        return Inspector.load(inspector)

    frames, notes = [], []
    for path in data:
        df, note = tuning.load_scored(path, model, max_rows=max_rows)
        frames.append(df)
        notes.append(note)
    df = pd.concat(frames, ignore_index=True)
    insp_lines, insp_fig = inspector_section(df, thr, out, worst)
    al_lines, al_fig = aligner_section(aligner_eval, thr, out, worst)
    data_rows = pd.DataFrame(notes).set_index("data")
    data_rows.index = [Path(i).name for i in data_rows.index]
    data_rows.index.name = "file"
    head = ["# Evaluation report", "",
            f"Inspector: `{inspector or os.environ.get('INSPECTOR_MODEL') or 'bundled default'}`; "
            f"aligner evaluation: `{aligner_eval or 'none'}`.", ""]
    if command:
        head += [f"Made with `{command}`.", ""]
    head += ["### Data", "", md_table(data_rows.fillna("")), ""]
    (out / "report.md").write_text("\n".join(head + insp_lines + al_lines))
    tuning.write_json({"data": notes, "inspector": insp_fig, "aligner": al_fig}, out / "report.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inspector", default=None, help="inspector folder (default: $INSPECTOR_MODEL or the bundled one)")
    ap.add_argument("--data", required=True, nargs="+", help="labelled JSONL/CSV/Parquet, scored or not")
    ap.add_argument("--aligner-eval", default=None, help="aligner.evaluate JSON, or pipeline.batch rows with --aligner")
    ap.add_argument("--threshold", type=float, default=None, help="default: the inspector's stored threshold")
    ap.add_argument("--max-rows", type=int, default=None, help="label-stratified sample per file (large files)")
    ap.add_argument("--worst", type=int, default=5, help="examples per error table")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        ap.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.max_rows is not None and args.max_rows < 1:
        ap.error(f"--max-rows must be a number of rows >= 1, got {args.max_rows}")
    if args.worst < 0:
        ap.error(f"--worst must be >= 0, got {args.worst}")
    try:
        path = build_report(args.data, args.out, args.inspector, args.threshold, args.aligner_eval,
                            args.max_rows, args.worst, command="python -m experiments.report " + " ".join(
                                sys.argv[1:] if argv is None else argv))
    except (OSError, ValueError) as e:  # a missing file, an unwritable --out, bad data
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
