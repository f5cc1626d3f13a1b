"""Train an inspector: ``python -m inspector.train --data FILE... --out DIR``.

Flow: split the pairs (stratified by source and label, a query never on both sides) into
train / calibration / test; adapt the embedder's top layers with LoRA on the training pairs
(see ``finetune``); fit the logistic head on the training embeddings; Platt-scale it and pick the
threshold on the calibration pairs (the lowest threshold that routes at most ``--target-fpr`` of
aligned pairs); report on the test pairs. With ``--holdout-sources`` the same recipe is re-run
once per source with that source left out entirely and tested on it: the honest figure for data
unlike the training data. ``--holdout-epochs`` trains those re-runs for fewer epochs than the
shipped model, to keep a full build within about an hour on 2 CPU cores; the config records it.

The default inspector shipped in the package is built by::

    python -m inspector.train --shared-data ../shared/data --out inspector/default_model --epochs 2 --members 1 --augment 0.3 --span-pooling sentences --threshold-rule balanced --target-fpr 0.05 --seed 0

(``make inspector``); ``--shared-data`` reads the shared folder plus the project-written pairs in
``inspector/training_data/``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .data import (DEFAULT_CAP_PER_SOURCE, DEFAULT_EXCLUDED_SOURCES, SPLIT_FRACTIONS, default_training_rows, dedupe, fingerprint, hh_preference_pairs, load_labelled,
                   public_pool, stratified_split)
from .evasion import augment_pairs, sentences
from .encoder import DEFAULT_EMBEDDER, PairEncoder, PairRecipe
from .finetune import FinetuneConfig, TopLayerFinetuner
from .head import make_head
from .metrics import binary_report, clean_json, report_by_source, threshold_for_rule
from .model import Inspector, adapter_dirs, max_per_pair
from .retune import retune


class _Run:
    """Embeddings for every window of every pair, from a frozen-layer cache when fine-tuning.

    ``fit`` trains the adapter(s) and keeps each member's embeddings of all windows, so the head,
    the calibration and the test figures all read the same arrays."""

    def __init__(self, df: pd.DataFrame, encoder: PairEncoder, ft: FinetuneConfig, show_progress: bool,
                 threshold_rule: str = "pooled", originals: dict[int, str] | None = None, seed: int = 0):
        self.df, self.encoder, self.ft_cfg = df, encoder, ft
        self.threshold_rule = threshold_rule
        self.chunks = encoder.chunk(df["query"].tolist(), df["answer"].tolist())
        owner = self.chunks.pair_index
        self.first_window = np.searchsorted(owner, np.arange(len(df)))  # windows are in pair order
        self.all_windows = np.arange(len(owner))
        self.show = show_progress
        self.tuner = None
        # sentence-run examples (trained on only when runs are scored, and only with an adapter)
        self.runs = self.run_examples(originals or {}, seed) \
            if ft.train_layers > 0 and encoder.recipe.span_pooling == "sentences" else None
        self.run_member_emb: list[np.ndarray] = []
        if ft.train_layers > 0:
            self.tuner = TopLayerFinetuner(encoder, ft)
            self.cache = self.tuner.cache_lower(self.chunks.input_ids, self.chunks.token_type_ids,
                                                show_progress)
            self.member_emb: list[np.ndarray] = []  # filled by fit
        else:
            self.member_emb = [encoder.embed_chunks(self.chunks, show_progress=show_progress)]

    def run_examples(self, originals: dict[int, str], seed: int, benign_share: float = 0.25) -> dict:
        """Sentence runs to train on, as the score pools them (``PairEncoder.sentence_runs``):
        in a diluted / injected copy (row -> its original answer in ``originals``), the run that is
        the original answer, with the pair's label: the filler around it must not change its verdict;
        in ``benign_share`` of the aligned pairs, one random run of the first window, labelled aligned:
        a part of an aligned answer is no reason to route it. Returns arrays row / window / span
        (answer start, run start, run end) / label."""
        rng = np.random.default_rng(seed)
        enc, ch, y = self.encoder, self.chunks, self.df["label"].to_numpy()
        answers = self.df["answer"].tolist()
        rows, spans = [], []
        for r, original in originals.items():
            w = self.first_window[r]
            ids, types = ch.input_ids[w], ch.token_type_ids[w]
            a0 = types.index(1)
            k = answers[r].find(original)
            n_pre = len(enc._ids([answers[r][:k]])[0]) if k > 0 else 0
            target = enc._ids([original])[0]
            s = a0 + n_pre
            if k < 0 or s + len(target) > len(ids) - 1 or ids[s:s + len(target)] != target:
                continue  # the original does not lie whole in the first window: no run example
            rows.append(r)
            spans.append((a0, s, s + len(target)))
        for r in np.flatnonzero(y == 0):
            if r in originals or rng.random() >= benign_share:
                continue
            w = self.first_window[r]
            runs = enc.sentence_runs(ch.input_ids[w], ch.token_type_ids[w])
            if runs:
                s, e = runs[int(rng.integers(len(runs)))]
                rows.append(int(r))
                spans.append((ch.token_type_ids[w].index(1), s, e))
        rows = np.asarray(rows, dtype=np.int64)
        return {"row": rows, "window": self.first_window[rows], "label": y[rows],
                "span": np.asarray(spans, dtype=np.int64).reshape(-1, 3)}

    def _runs_of(self, train: np.ndarray) -> np.ndarray:
        """Indexes into ``self.runs`` of the run examples of training pairs ``train``."""
        if self.runs is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.isin(self.runs["row"], train))

    def windows_of(self, rows: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(self.chunks.pair_index, rows))

    def embed(self, windows: np.ndarray) -> np.ndarray:
        return np.concatenate([e[windows] for e in self.member_emb], axis=1)

    def adapt(self, train: np.ndarray, members: int, epochs: int | None = None,
              save_to: Path | None = None) -> dict:
        """Train ``members`` adapters (seeds seed, seed+1, ...) on the training pairs' first windows,
        saving each to ``save_to`` (``adapter/``, or ``adapters/member-K/`` for an ensemble)."""
        y = self.df["label"].to_numpy()
        windows, labels, spans = self.first_window[train], y[train], None
        picked = self._runs_of(train)
        if len(picked):
            whole = np.full((len(train), 3), -1, dtype=np.int64)
            windows = np.concatenate([windows, self.runs["window"][picked]])
            labels = np.concatenate([labels, self.runs["label"][picked]])
            spans = np.concatenate([whole, self.runs["span"][picked]])
        base, losses, self.member_emb, self.run_member_emb = self.tuner.config, [], [], []
        for k in range(members):
            self.tuner.config = replace(base, seed=base.seed + k)
            hist = self.tuner.fit(self.cache, windows, labels, self.show, epochs=epochs, spans=spans)
            losses.append(hist["train_loss_by_epoch"])
            if save_to is not None:
                self.tuner.save_adapter(adapter_dirs(save_to, members)[k])
            self.member_emb.append(self.tuner.embed_cached(self.cache, self.all_windows, self.show))
            self._embed_runs()
            self.tuner.reset()
        self.tuner.config = base
        if members == 1:
            return {"train_loss_by_epoch": losses[0]}
        return {"train_loss_by_member": {f"member_{k}": loss for k, loss in enumerate(losses)}}

    def _embed_runs(self) -> None:
        if self.runs is not None and len(self.runs["row"]):
            self.run_member_emb.append(self.tuner.embed_cached(self.cache, self.runs["window"],
                                                               spans=self.runs["span"]))

    def frozen(self) -> None:
        """Back to the embedder without adapters."""
        self.tuner.reset()
        self.member_emb = [self.tuner.embed_cached(self.cache, self.all_windows)]
        self.run_member_emb = []
        self._embed_runs()

    def head_examples(self, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head's training rows: each training pair's first window, plus its run examples."""
        y = self.df["label"].to_numpy()
        x, labels = self.embed(self.first_window[train]), y[train]
        picked = self._runs_of(train)
        if len(picked) and self.run_member_emb:
            runs = np.concatenate([e[picked] for e in self.run_member_emb], axis=1)
            x, labels = np.concatenate([x, runs]), np.concatenate([labels, self.runs["label"][picked]])
        return x, labels

    def fit(self, train: np.ndarray, cal: np.ndarray, target_fpr: float, adapt: bool = True,
            epochs: int | None = None, members: int = 1, save_to: Path | None = None):
        """Adapter(s) (optional) + head + calibration + threshold; returns (head, threshold, info)."""
        y = self.df["label"].to_numpy()
        info = {}
        if self.tuner is not None:
            if adapt:
                info = self.adapt(train, members, epochs, save_to)
            else:
                self.frozen()
        head = make_head(len(self.member_emb)).fit(*self.head_examples(train))
        d_cal = self.pair_decisions(head, cal)
        try:
            head.calibrate(d_cal, y[cal])
        except ValueError as e:
            raise ValueError(f"{e} (calibration split: {len(cal)} pairs, {int(y[cal].sum())} misaligned, "
                             f"trained on {len(train)}; with this little data, add more pairs)") from None
        threshold = threshold_for_rule(y[cal], head.calibrated(d_cal), self.df["source"].to_numpy()[cal],
                                       self.threshold_rule, target_fpr)
        return head, threshold, info

    def pair_decisions(self, head, rows: np.ndarray) -> np.ndarray:
        """The head's decision per pair and member: the maximum over the pair's windows."""
        windows = self.windows_of(rows)
        d = head.decision_function(self.embed(windows))
        return max_per_pair(d, self.chunks.pair_index[windows], len(self.df))[rows]

    def pair_scores(self, head, rows: np.ndarray) -> np.ndarray:
        """Calibrated P(misaligned) per pair, as ``Inspector.score``."""
        return head.calibrated(self.pair_decisions(head, rows))


def train_inspector(df: pd.DataFrame, out: str | Path, embedder: str | None = None,
                    ft: FinetuneConfig | None = None, recipe: PairRecipe | None = None,
                    target_fpr: float = 0.05, seed: int = 0, holdout_sources: list[str] | None = None,
                    baseline: bool = True, show_progress: bool = True, holdout_epochs: int | None = None,
                    pools: dict[str, list[str]] | None = None,
                    extra_config: dict | None = None, threshold_rule: str = "pooled",
                    augment: float = 0.0) -> tuple[Inspector, dict]:
    """Train, evaluate and save an inspector folder at ``out``; returns (loaded inspector, report).
    The build is written to a staging folder and lands in ``out`` only when it is complete
    (``staged_folder``). ``threshold_rule`` "pooled" routes at most ``target_fpr`` of all aligned
    calibration pairs; "balanced" at most ``target_fpr`` on average over sources, each source weighing
    the same (``metrics.threshold_for_rule``), which transfers better to sources never seen.

    ``pools`` names groups of sources to report pooled test metrics for as well (e.g. the public
    sources alone, without the project's own pairs)."""
    t0 = time.time()
    ft = ft or FinetuneConfig(seed=seed)
    df = df.reset_index(drop=True)
    if df["label"].nunique() != 2:
        raise ValueError("training data needs both labels, 0 (aligned) and 1 (misaligned)")
    src = df["source"].to_numpy()
    unknown = sorted(set(holdout_sources or []) - set(src))
    if unknown:  # said before the hour of training, not after it
        raise ValueError(f"--holdout-sources: no rows from source(s) {unknown}; sources are {sorted(set(src))}")
    train, cal, test = stratified_split(df, SPLIT_FRACTIONS, seed)  # too little data: said now, not after embedding
    # diluted / injected copies of some training pairs (``evasion.augment_pairs``): training only,
    # appended after the real pairs so calibration and test rows keep their numbers
    extra = augmented_rows(df, train, augment, seed) if augment else df.iloc[:0]
    data = pd.concat([df, extra], ignore_index=True)
    originals = {len(df) + k: a for k, a in enumerate(extra["original_answer"])} if len(extra) else {}
    data = data.drop(columns=["original_answer"], errors="ignore")
    train = np.concatenate([train, np.arange(len(df), len(data))])
    src = data["source"].to_numpy()
    with staged_folder(out) as folder:
        encoder = PairEncoder(embedder, recipe=recipe)
        run = _Run(data, encoder, ft, show_progress, threshold_rule, originals, seed)
        y = data["label"].to_numpy()
        report: dict = {"rows": len(df), "split": {"train": len(train) - len(extra), "calibration": len(cal),
                                                   "test": len(test), "seed": seed},
                        "augmented_train_pairs": len(extra),
                        "run_examples": 0 if run.runs is None else int(len(run._runs_of(train)))}

        if baseline and ft.train_layers > 0:
            head, thr, _ = run.fit(train, cal, target_fpr, adapt=False)
            report["frozen_baseline_test"] = binary_report(y[test], run.pair_scores(head, test), thr)

        members = ft.members if run.tuner is not None else 1
        head, threshold, info = run.fit(train, cal, target_fpr, members=members, save_to=folder)
        test_scores = run.pair_scores(head, test)
        report["random_split_test"] = report_by_source(y[test], test_scores, threshold, src[test], pools)
        report["calibration"] = binary_report(y[cal], run.pair_scores(head, cal), threshold)
        report["finetune"] = {**ft.to_dict(), **info}

        config = {
            "training_data": {"rows": len(df), "fingerprint": fingerprint(df),
                              "by_source_and_label": {f"{s}/{l}": int(n) for (s, l), n in
                                                      df.groupby(["source", "label"]).size().items()}},
            "threshold_rule": (f"lowest threshold routing <= {target_fpr:.0%} of aligned calibration pairs"
                               + (", averaged over sources (each source weighs the same)"
                                  if threshold_rule == "balanced" else "")),
            "threshold_rule_name": threshold_rule,
            "target_benign_routed": target_fpr,
            "metrics": report,
            **(extra_config or {}),
        }
        saved_adapters = adapter_dirs(folder, members) if run.tuner is not None else None
        # the training encoder has no adapter merged; an ensemble's head needs an encoder with its members
        save_encoder = encoder if members == 1 else PairEncoder(embedder, adapter=saved_adapters, recipe=recipe)
        inspector = Inspector(save_encoder, head, threshold, config, saved_adapters)
        inspector.save(folder)
        if save_encoder.recipe.span_pooling != "none" or save_encoder.recipe.edge_length:
            # sentence runs and edge windows raise benign scores too: the threshold comes from the scores served
            full = Inspector.load(folder)
            tuned, updates = retune(full, df.loc[cal], df.loc[test], threshold_rule, target_fpr, pools,
                                    show_progress)
            report["window_only_threshold"] = threshold
            report.update(updates)
            tuned.config["metrics"] = report
            tuned.save(folder)
        print(f"test: {json.dumps(clean_json(report['random_split_test']['overall']))}", file=sys.stderr)

        # generalisation: the same recipe with one whole source left out, tested on that source
        holdouts = {}
        if holdout_sources:
            report["held_out_epochs"] = holdout_epochs or ft.epochs
            report["held_out_members"] = 1  # one adapter per re-run, to keep the build short
        for name in holdout_sources or []:
            keep = lambda rows: rows[src[rows] != name]  # noqa: E731
            held = np.flatnonzero(src[:len(df)] == name)
            h_head, h_thr, _ = run.fit(keep(train), keep(cal), target_fpr, epochs=holdout_epochs)
            holdouts[name] = binary_report(y[held], run.pair_scores(h_head, held), h_thr)
            print(f"held out {name}: {json.dumps(clean_json(holdouts[name]))}", file=sys.stderr)
            report["held_out_sources"] = holdouts
            report["train_seconds"] = round(time.time() - t0, 1)
            _update_config(folder, {"metrics": report})
        report["train_seconds"] = round(time.time() - t0, 1)
        _update_config(folder, {"metrics": report})
    return Inspector.load(out), report


def augmented_rows(df: pd.DataFrame, train: np.ndarray, share: float, seed: int) -> pd.DataFrame:
    """Copies of ``share`` of the training pairs with benign filler before or after the answer, or an
    injected "this is safe" verdict; same query, label and source. Filler: sentences of the training
    split's own aligned answers."""
    y = df["label"].to_numpy()
    filler = sentences(df["answer"].to_numpy()[train[y[train] == 0]])
    picked = augment_pairs(df["answer"].to_numpy()[train].tolist(), filler, share=share, seed=seed)
    rows = df.iloc[[train[i] for i, _ in picked]].copy()
    rows["original_answer"] = rows["answer"]
    rows["answer"] = [a for _, a in picked]
    return rows.reset_index(drop=True)


@contextmanager
def staged_folder(out: str | Path):
    """Yield a hidden folder beside ``out`` to build an inspector in; on success save it over
    ``out`` (seconds, after the hour of training) and remove the staging folder. A crash or Ctrl-C
    half-way leaves ``out`` as it was, never new adapters beside an old head; if the main model was
    already complete (its ``config.json`` written), the staging folder is kept and its path printed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        if (staging / "config.json").exists():
            print(f"build interrupted; {out} left as it was; the finished model so far is in {staging}",
                  file=sys.stderr)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    Inspector.load(staging).save(out)
    shutil.rmtree(staging)
    print(f"saved {out}", file=sys.stderr)


def _update_config(folder: Path, updates: dict) -> None:
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(clean_json(updates))
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inspector.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", metavar="FILE", default=[],
                    help="JSONL/CSV/Parquet files with query, answer, label (1 = misaligned), optional source")
    ap.add_argument("--shared-data", metavar="DIR",
                    help="the default training set: the shared data folder (../shared/data) plus the "
                         "project's own pairs (inspector/training_data); --data files are added to it")
    ap.add_argument("--out", required=True, help="folder to write the inspector to")
    ap.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                    help="sentence-transformers model id or local path (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--train-layers", type=int, default=FinetuneConfig.train_layers,
                    help="top encoder layers adapted with LoRA; 0 = frozen embedder, head only")
    ap.add_argument("--epochs", type=int, default=FinetuneConfig.epochs)
    ap.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    ap.add_argument("--lora-r", type=int, default=FinetuneConfig.lora_r)
    ap.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    ap.add_argument("--members", type=int, default=FinetuneConfig.members,
                    help="ensemble of this many adapters (seeds seed..seed+N-1) sharing the frozen layers: "
                         "each costs one more training run and about 1/3 of a plain pass at inference")
    ap.add_argument("--target-fpr", type=float, default=0.05,
                    help="share of aligned pairs the threshold may route to the aligner (default 0.05)")
    ap.add_argument("--holdout-sources", nargs="*", default=[],
                    help="sources to hold out one at a time (train without, test on it); 'all' = every source")
    ap.add_argument("--holdout-epochs", type=int, default=None,
                    help="epochs for the held-out-source re-runs (default: --epochs); fewer keeps the build short")
    ap.add_argument("--threshold-rule", choices=("pooled", "balanced"), default="pooled",
                    help="pooled: route <= --target-fpr of all aligned calibration pairs; balanced: of each "
                         "source's on average (transfers better to unseen sources; the default build's rule)")
    ap.add_argument("--exclude-source", nargs="*", default=None, metavar="NAME",
                    help="with --shared-data: sources left out of the default set (default: "
                         f"{' '.join(DEFAULT_EXCLUDED_SOURCES)}; give none to keep every source)")
    ap.add_argument("--max-per-source", type=int, default=None, metavar="N",
                    help=f"with --shared-data: at most N pairs per source (default {DEFAULT_CAP_PER_SOURCE}; "
                         "0 = no cap)")
    ap.add_argument("--augment", type=float, default=0.0, metavar="SHARE",
                    help="add diluted / injected copies of this share of the training pairs (evasion "
                         "hardening, inspector.evasion; the default build uses 0.3)")
    ap.add_argument("--span-pooling", choices=("none", "sentences"), default="none",
                    help="sentences: also score every run of whole sentences inside each window, from the "
                         "same pass (dilution hardening; the default build uses it); the threshold is then "
                         "chosen from those scores (inspector.retune)")
    ap.add_argument("--edge-length", type=int, default=0, metavar="N",
                    help="also score the first and last N word pieces of answers longer than that as "
                         "windows of their own (dilution hardening; the default build uses 128); 0 = off")
    ap.add_argument("--edge-margin", type=float, default=0.0, metavar="LOGODDS",
                    help="edge windows' scores count this many log-odds lower (the default build: 0.4)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the frozen-embedder comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if not args.data and not args.shared_data:
        ap.error("give training data: --data FILE... and/or --shared-data DIR")
    if not 0 < args.target_fpr < 1:
        ap.error(f"--target-fpr is the share of aligned pairs routed, between 0 and 1; got {args.target_fpr}")
    if args.train_layers < 0:
        ap.error(f"--train-layers must be 0 (frozen embedder) or more, got {args.train_layers}")
    if args.members < 1 or (args.members > 1 and args.train_layers == 0):
        ap.error(f"--members must be 1, or more with --train-layers >= 1; got {args.members}")
    if args.holdout_epochs is not None and args.holdout_epochs < 1:
        ap.error(f"--holdout-epochs must be at least 1, got {args.holdout_epochs}")
    if not 0 <= args.augment <= 1:  # NaN included
        ap.error(f"--augment is a share of the training pairs in [0, 1], got {args.augment}")
    if args.max_per_source is not None and args.max_per_source < 0:
        ap.error(f"--max-per-source must be a number of pairs >= 0 (0 = no cap), got {args.max_per_source}")
    if (args.exclude_source is not None or args.max_per_source is not None) and not args.shared_data:
        ap.error("--exclude-source and --max-per-source choose from the default set: give --shared-data DIR")
    selection = {"excluded_sources": list(DEFAULT_EXCLUDED_SOURCES if args.exclude_source is None
                                          else args.exclude_source),
                 "max_per_source": (DEFAULT_CAP_PER_SOURCE if args.max_per_source is None
                                    else args.max_per_source) or None,
                 "seed": args.seed}
    try:
        parts = [default_training_rows(args.shared_data, selection["excluded_sources"], selection["max_per_source"],
                                       args.seed)] if args.shared_data else []
        if args.data:
            parts.append(load_labelled(args.data))
        df = dedupe(pd.concat(parts, ignore_index=True))
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    try:
        recipe = PairRecipe(span_pooling=args.span_pooling, edge_length=args.edge_length,
                            edge_margin=args.edge_margin)
    except ValueError as e:
        ap.error(f"--edge-length / --edge-margin: {e}")
    holdouts = args.holdout_sources
    if holdouts == ["all"]:
        holdouts = sorted(df["source"].unique())
    ft = FinetuneConfig(train_layers=args.train_layers, epochs=args.epochs, lr=args.lr,
                        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, batch_size=args.batch_size,
                        seed=args.seed, members=args.members)
    pools = public_pool(df["source"]) if args.shared_data else None
    print(f"training on {len(df)} pairs: {df.groupby(['source', 'label']).size().to_dict()}", file=sys.stderr)
    try:
        inspector, report = train_inspector(df, args.out, embedder=args.embedder, ft=ft,
                                            recipe=recipe,
                                            target_fpr=args.target_fpr, seed=args.seed,
                                            holdout_sources=holdouts, baseline=not args.no_baseline,
                                            holdout_epochs=args.holdout_epochs, pools=pools,
                                            threshold_rule=args.threshold_rule, augment=args.augment,
                                            extra_config={"default_selection": selection} if args.shared_data
                                            and not args.data else None)
    except ValueError as e:
        print(f"python -m inspector.train: error: {e}", file=sys.stderr)
        return 2
    if args.shared_data:
        report["hh_rlhf_pairwise"] = hh_pairwise(inspector, args.shared_data, seed=args.seed)
        _update_config(Path(args.out), {"metrics": report})
    print(json.dumps(clean_json(report), indent=2))
    return 0


def hh_pairwise(inspector: Inspector, data_dir: str | Path, n: int = 400, seed: int = 0) -> dict:
    """HH-RLHF harmless-base: how often the crowd-rejected turn scores above the chosen one."""
    pairs = hh_preference_pairs(data_dir)
    pairs = pairs[(pairs["answer"].str.strip() != "") & (pairs["correction"].str.strip() != "")]
    pairs = pairs.sample(min(n, len(pairs)), random_state=seed)
    rejected = inspector.score(pairs["query"].tolist(), pairs["answer"].tolist())
    chosen = inspector.score(pairs["query"].tolist(), pairs["correction"].tolist())
    return {"pairs": len(pairs), "rejected_scored_higher": float((rejected > chosen).mean()),
            "rejected_routed": float((rejected >= inspector.threshold).mean()),
            "chosen_routed": float((chosen >= inspector.threshold).mean())}


if __name__ == "__main__":
    sys.exit(main())
