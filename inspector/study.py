"""Leave-one-source-out study: how a recipe does on a kind of traffic it never saw.

``python -m inspector.study --shared-data ../shared/data`` (``make loso``) re-fits a recipe once per
public source group with that group left out of training *and* calibration, scores every pair of
the left-out group, and reports per group: ROC-AUC, recall at 5% benign routed, and benign routed /
harmful caught at the threshold the recipe would have shipped; then their mean and worst case,
with bootstrap intervals. Random splits flatter a model (it learns each source's style); this is
the figure that predicts unseen benchmarks, so recipes are compared on its mean.

Why frozen features: the study must be cheap enough to run for every recipe tried. The embedder
runs once over every pair (about 10 minutes on 2 cores, cached on disk by data fingerprint), and
each leave-out fit is then a logistic regression of a few seconds. The LoRA-adapted build is
re-measured under the same protocol by ``inspector.train --holdout-sources`` (slower: one adapter
run per group).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import (DEFAULT_CAP_PER_SOURCE, DEFAULT_EXCLUDED_SOURCES, PROJECT_SOURCES, SPLIT_FRACTIONS,
                   candidate_training_rows, cap_per_source, fingerprint, stratified_split)
from .encoder import DEFAULT_EMBEDDER, PairEncoder, PairRecipe
from .metrics import binary_report, clean_json, recall_at_fpr, threshold_for_rule
from .model import max_per_pair
from .text import TEXT_VERSION

# sources that are one kind of traffic are left out together (DICES' two sets share their chats' style)
GROUPS = {"dices_990": "dices", "dices_350": "dices", "diasafety_expertise": "diasafety"}


def group_of(source: str) -> str:
    return GROUPS.get(source, source)


# -- frozen features, cached ------------------------------------------------------------------
def frozen_features(df: pd.DataFrame, embedder: str | None = None, cache_dir: str | Path | None = None,
                    show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(window embeddings, pair index of each window) of every pair through the frozen embedder,
    read from ``cache_dir`` when the same pairs, embedder and recipe were embedded before."""
    recipe = PairRecipe()
    key = hashlib.sha256(json.dumps([fingerprint(df), embedder or DEFAULT_EMBEDDER, recipe.to_dict(), TEXT_VERSION],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"frozen-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as z:
            return z["emb"], z["owner"]
    encoder = PairEncoder(embedder, recipe=recipe)
    emb, owner = encoder.encode(df["query"].tolist(), df["answer"].tolist(), show_progress=show_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, emb=emb.astype(np.float16), owner=owner)
        tmp.replace(path)
    return emb, owner


# -- recipes ----------------------------------------------------------------------------------
@dataclass
class StudyRecipe:
    """What a frozen-feature recipe decides: which sources train, how they are weighted, how the
    threshold is chosen. ``exclude`` sources are never trained on but are still scored as unseen."""

    name: str
    exclude: tuple[str, ...] = ()
    balance: str = "none"          # "none": every pair weighs the same; "source": every source the same
    threshold_rule: str = "pooled"  # "pooled": <= target of all aligned calibration pairs; "balanced": mean over sources
    target: float = 0.05
    C: float = 1.0
    cap: int | None = None          # at most this many pairs per source (``data.cap_per_source``)

    def to_dict(self) -> dict:
        return asdict(self)


def source_weights(sources: np.ndarray, labels: np.ndarray, balance: str) -> np.ndarray:
    """Per-pair training weights: classes balanced, and with ``balance="source"`` every source
    weighs the same in total (a source of 11k chit-chat replies does not drown 800 jailbreak answers)."""
    w = np.ones(len(labels), dtype=np.float64)
    if balance == "source":
        for s in np.unique(sources):
            m = sources == s
            w[m] = 1.0 / m.sum()
    elif balance != "none":
        raise ValueError(f"balance must be 'none' or 'source', got {balance!r}")
    for c in (0, 1):  # then the two classes carry equal total weight
        m = labels == c
        if m.any():
            w[m] *= 0.5 / w[m].sum()
    return w * len(labels)


# -- one leave-out fit --------------------------------------------------------------------------
class FrozenStudy:
    """Frozen window embeddings of every candidate pair, and the fixed train / calibration split."""

    def __init__(self, df: pd.DataFrame, emb: np.ndarray, owner: np.ndarray, seed: int = 0):
        self.df = df.reset_index(drop=True)
        self.seed = seed
        self._capped: dict[int, np.ndarray] = {}
        self.emb, self.owner = emb.astype(np.float32), owner
        self.first = np.searchsorted(owner, np.arange(len(df)))
        self.y = self.df["label"].to_numpy().astype(int)
        self.src = self.df["source"].astype(str).to_numpy()
        self.grp = np.array([group_of(s) for s in self.src])
        _, cal, _ = stratified_split(self.df, SPLIT_FRACTIONS, seed)
        # the study trains on train + test parts (the test part belongs to the random-split figures)
        self.part = np.zeros(len(df), dtype=np.int8)
        self.part[cal] = 1

    def capped(self, cap: int) -> np.ndarray:
        """Rows kept by ``cap_per_source`` (the build's own subsampling), as a mask; once per cap."""
        if cap not in self._capped:
            kept = cap_per_source(self.df.assign(_row=np.arange(len(self.df))), cap, self.seed)
            self._capped[cap] = np.isin(np.arange(len(self.df)), kept["_row"].to_numpy())
        return self._capped[cap]

    def decisions(self, coef: np.ndarray, intercept: float, rows: np.ndarray) -> np.ndarray:
        """Head decision per pair: the maximum over its windows (as ``Inspector.score``)."""
        win = np.flatnonzero(np.isin(self.owner, rows))
        return max_per_pair(self.emb[win] @ coef + intercept, self.owner[win], len(self.df))[rows]

    def fit(self, recipe: StudyRecipe, leave_out: str | None) -> tuple[callable, float]:
        """Head + Platt + threshold trained without group ``leave_out``; returns (scorer, threshold)."""
        from sklearn.linear_model import LogisticRegression

        use = ~np.isin(self.src, list(recipe.exclude))
        if recipe.cap:
            use &= self.capped(recipe.cap)
        if leave_out is not None:
            use &= self.grp != leave_out
        train = np.flatnonzero(use & (self.part == 0))
        cal = np.flatnonzero(use & (self.part == 1))
        w = source_weights(self.src[train], self.y[train], recipe.balance)
        lr = LogisticRegression(C=recipe.C, max_iter=3000)
        lr.fit(self.emb[self.first[train]], self.y[train], sample_weight=w)
        coef, b = lr.coef_.ravel(), float(lr.intercept_[0])
        d_cal = self.decisions(coef, b, cal)
        platt = LogisticRegression(C=1e6, max_iter=1000).fit(d_cal.reshape(-1, 1), self.y[cal])
        a, c = float(platt.coef_[0, 0]), float(platt.intercept_[0])

        def score(rows: np.ndarray) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-np.clip(a * self.decisions(coef, b, rows) + c, -50, 50)))

        thr = threshold_for_rule(self.y[cal], score(cal), self.src[cal], recipe.threshold_rule, recipe.target)
        return score, thr

    def leave_one_out(self, recipe: StudyRecipe, groups: list[str]) -> dict[str, dict]:
        """Per left-out group: its scores, labels and the threshold the recipe would have shipped."""
        out = {}
        for g in groups:
            score, thr = self.fit(recipe, g)
            rows = np.flatnonzero(self.grp == g)
            out[g] = {"y": self.y[rows], "scores": score(rows), "threshold": thr}
        return out


# -- figures ------------------------------------------------------------------------------------
def group_figures(y: np.ndarray, s: np.ndarray, thr: float) -> dict:
    r = binary_report(y, s, thr)
    keep = ("n", "positives", "negatives", "threshold", "roc_auc", "recall_at_5pct_fpr", "benign_routed",
            "harmful_caught", "f1")
    return {k: r[k] for k in keep if k in r}


HEADLINE = ("roc_auc", "recall_at_5pct_fpr", "benign_routed", "harmful_caught", "f1")


def summarise(results: dict[str, dict], n_boot: int = 200, seed: int = 0) -> dict:
    """Per-group figures, their mean and worst case, and bootstrap intervals of the means (each
    group's pairs resampled within the group, classes separately; the fitted models stay fixed)."""
    per = {g: group_figures(r["y"], r["scores"], r["threshold"]) for g, r in results.items()}

    def means(figs: dict[str, dict]) -> dict:
        out = {}
        for k in HEADLINE:
            vals = [f[k] for f in figs.values() if k in f and f[k] == f[k]]
            if vals:
                worst = max(vals) if k == "benign_routed" else min(vals)
                out[k] = {"mean": float(np.mean(vals)), "worst": float(worst), "groups": len(vals)}
        return out

    summary = means(per)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in summary}
    for _ in range(n_boot):
        figs = {}
        for g, r in results.items():
            y, s = r["y"], r["scores"]
            idx = np.concatenate([rng.choice(np.flatnonzero(y == c), (y == c).sum()) for c in (0, 1) if (y == c).any()])
            figs[g] = group_figures(y[idx], s[idx], r["threshold"])
        for k, v in means(figs).items():
            draws[k].append(v["mean"])
    for k, v in draws.items():
        if v:
            summary[k]["ci95"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    return {"by_group": per, "summary": summary}


def _one_metric(metric: str, y: np.ndarray, s: np.ndarray, thr: float) -> float:
    """One of ``HEADLINE`` without the rest of ``binary_report`` (the bootstrap computes it thousands of times);
    NaN where the group lacks the class it needs."""
    from sklearn.metrics import roc_auc_score

    pos, neg = y == 1, y == 0
    if metric == "benign_routed":
        return float((s[neg] >= thr).mean()) if neg.any() else float("nan")
    if metric == "harmful_caught":
        return float((s[pos] >= thr).mean()) if pos.any() else float("nan")
    if not (pos.any() and neg.any()):
        return float("nan")
    if metric == "roc_auc":
        return float(roc_auc_score(y, s))
    if metric == "recall_at_5pct_fpr":
        return recall_at_fpr(y, s, 0.05)
    return float(group_figures(y, s, thr).get(metric, float("nan")))


def paired_difference(a: dict[str, dict], b: dict[str, dict], metric: str = "recall_at_5pct_fpr",
                      n_boot: int = 200, seed: int = 0) -> dict:
    """Mean over groups of recipe ``a`` minus recipe ``b`` for ``metric``, with a paired bootstrap
    interval (the same resampled pairs score both recipes)."""
    rng = np.random.default_rng(seed)
    groups = [g for g in a if g in b]

    def mean_diff(pick) -> float:
        diffs = []
        for g in groups:
            idx = pick(g)
            va = _one_metric(metric, a[g]["y"][idx], a[g]["scores"][idx], a[g]["threshold"])
            vb = _one_metric(metric, b[g]["y"][idx], b[g]["scores"][idx], b[g]["threshold"])
            if va == va and vb == vb:
                diffs.append(va - vb)
        return float(np.mean(diffs)) if diffs else float("nan")

    point = mean_diff(lambda g: np.arange(len(a[g]["y"])))
    draws = []
    for _ in range(n_boot):
        def pick(g):
            y = a[g]["y"]
            return np.concatenate([rng.choice(np.flatnonzero(y == c), (y == c).sum()) for c in (0, 1) if (y == c).any()])
        draws.append(mean_diff(pick))
    return {"metric": metric, "mean_difference": point,
            "ci95": [float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))]}


# sources that arrived with the second round of shared data
NEW_SOURCES = ("alpaca_eval_outputs", "diasafety", "diasafety_expertise", "dices_350", "dices_990",
               "gptfuzz_jailbreak_responses", "safeunlearning")

# SafeUnlearning has no licence file: research use only, never in the shipped default (shared data README)
UNLICENSED = ("safeunlearning",)
_SHIPPABLE = dict(exclude=DEFAULT_EXCLUDED_SOURCES, balance="source", threshold_rule="balanced",
                  cap=DEFAULT_CAP_PER_SOURCE)
RECIPES = {r.name: r for r in [
    StudyRecipe("previous-data", exclude=NEW_SOURCES),
    StudyRecipe("all-data"),
    StudyRecipe("all-data-balanced", balance="source", threshold_rule="balanced"),
    StudyRecipe("all-but-expertise-balanced", exclude=("diasafety_expertise",), balance="source",
                threshold_rule="balanced"),
    StudyRecipe("shippable-weighted-5pct", **_SHIPPABLE),
    StudyRecipe("shippable-weighted-3pct", **_SHIPPABLE, target=0.03),
    StudyRecipe("shippable-3pct", **{**_SHIPPABLE, "balance": "none"}, target=0.03),
    StudyRecipe("shippable-5pct", **{**_SHIPPABLE, "balance": "none"}),
    StudyRecipe("shippable-no-diasafety-3pct", **{**_SHIPPABLE, "balance": "none",
                                                   "exclude": _SHIPPABLE["exclude"] + ("diasafety",)}, target=0.03),
]}
# the recipe of the bundled default's data and threshold (inspector.data.DEFAULT_*; make inspector): the
# cap is its only balancing, as the adapter's training weighs every pair the same
DEFAULT_RECIPE = "shippable-5pct"


def public_groups(sources) -> list[str]:
    """Every left-out group but the project's own pairs (reported, not in the mean)."""
    return sorted({group_of(s) for s in sources} - set(PROJECT_SOURCES))


def run_study(df: pd.DataFrame, emb: np.ndarray, owner: np.ndarray, recipes: list[StudyRecipe],
              seed: int = 0, n_boot: int = 200, show_progress: bool = True) -> dict:
    """Every recipe, left out group by group; figures per group, mean, worst, intervals, and each
    recipe's mean difference to the first one (paired bootstrap)."""
    from tqdm.auto import tqdm

    study = FrozenStudy(df, emb, owner, seed=seed)
    groups = public_groups(study.src)
    extra = sorted({group_of(s) for s in study.src} - set(groups))
    raw, out = {}, {"groups": groups, "seed": seed, "recipes": {}}
    for recipe in tqdm(recipes, desc="recipes", disable=not show_progress):
        raw[recipe.name] = study.leave_one_out(recipe, groups + extra)
        public = {g: r for g, r in raw[recipe.name].items() if g in groups}
        res = summarise(public, n_boot=n_boot, seed=seed)
        res["project_groups"] = {g: group_figures(r["y"], r["scores"], r["threshold"])
                                 for g, r in raw[recipe.name].items() if g in extra}
        out["recipes"][recipe.name] = {"recipe": recipe.to_dict(), **res}
    base = recipes[0].name
    for recipe in recipes[1:]:
        out["recipes"][recipe.name]["vs_" + base] = {
            m: paired_difference({g: raw[recipe.name][g] for g in groups}, {g: raw[base][g] for g in groups},
                                 m, n_boot=n_boot, seed=seed)
            for m in ("roc_auc", "recall_at_5pct_fpr", "benign_routed")}
    return out


def markdown(result: dict) -> str:
    """The study as tables: one row per recipe (means), then per group for every recipe."""
    def fmt(v, pct=False):
        return "—" if v is None or v != v else (f"{v:.1%}" if pct else f"{v:.3f}")

    lines = ["| recipe | ROC-AUC mean (95% CI) | recall @ 5% benign routed, mean (CI) / worst | "
             "benign routed at its threshold, mean (CI) / worst | harmful caught, mean |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in result["recipes"].items():
        s = r["summary"]
        ci = lambda k: "[" + ", ".join(fmt(x, k == "benign_routed") for x in s[k].get("ci95", [])) + "]"  # noqa: E731
        lines.append(f"| {name} | {fmt(s['roc_auc']['mean'])} {ci('roc_auc')} | "
                     f"{fmt(s['recall_at_5pct_fpr']['mean'])} {ci('recall_at_5pct_fpr')} / "
                     f"{fmt(s['recall_at_5pct_fpr']['worst'])} | {fmt(s['benign_routed']['mean'], True)} "
                     f"{ci('benign_routed')} / {fmt(s['benign_routed']['worst'], True)} | "
                     f"{fmt(s['harmful_caught']['mean'])} |")
    lines += ["", "| left-out group | " + " | ".join(result["recipes"]) + " |",
              "| --- |" + " --- |" * len(result["recipes"])]
    groups = result["groups"] + sorted(next(iter(result["recipes"].values()))["project_groups"])
    for g in groups:
        cells = []
        for r in result["recipes"].values():
            f = r["by_group"].get(g) or r["project_groups"].get(g)
            cells.append(f"{fmt(f.get('roc_auc'))} / {fmt(f.get('recall_at_5pct_fpr'))} / "
                         f"{fmt(f.get('benign_routed'), True)}")
        lines.append(f"| {g} ({next(iter(result['recipes'].values()))['by_group'].get(g, {}).get('n', '')}) | "
                     + " | ".join(cells) + " |")
    lines.append("\n(cells: ROC-AUC / recall at 5% benign routed / benign routed at the recipe's threshold)")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """Recall at 5% benign routed and benign routed at the threshold, per left-out group and recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, groups = list(result["recipes"]), result["groups"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(names)
    for ax, key, title in ((axes[0], "recall_at_5pct_fpr", "recall at 5% benign routed (higher is better)"),
                           (axes[1], "benign_routed", "benign routed at the threshold (lower is better)")):
        for i, n in enumerate(names):
            vals = [result["recipes"][n]["by_group"][g].get(key, np.nan) for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, vals, width, label=n)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
        ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "benign_routed":
            ax.axhline(0.05, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.suptitle("each source left out of training and calibration in turn (frozen-feature study)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inspector.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared-data", required=True, metavar="DIR", help="the shared data folder (../shared/data)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="NAME",
                    help=f"recipes to compare, the first is the baseline (default: all of {', '.join(RECIPES)})")
    ap.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "inspector-study"), metavar="DIR",
                    help="where frozen embeddings are kept between runs")
    ap.add_argument("--out", metavar="DIR", help="write study.json, study.md and study.png here")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap draws for the intervals")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    if args.bootstrap < 1:
        ap.error(f"--bootstrap must be at least 1, got {args.bootstrap}")
    try:
        df = candidate_training_rows(args.shared_data)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    t0 = time.time()
    emb, owner = frozen_features(df, args.embedder, args.cache)
    result = run_study(df, emb, owner, [RECIPES[r] for r in args.recipes], seed=args.seed, n_boot=args.bootstrap)
    result["embedder"], result["rows"], result["seconds"] = args.embedder, len(df), round(time.time() - t0, 1)
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.json").write_text(json.dumps(clean_json(result), indent=2) + "\n")
        (out / "study.md").write_text(table + "\n")
        plot(result, out / "study.png")
        print(f"wrote {out}/study.json, study.md, study.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
