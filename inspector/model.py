"""The inspector: scores (query, answer) pairs for misalignment and decides what to route."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .encoder import DEFAULT_EMBEDDER, PairEncoder, PairRecipe
from .head import CalibratedLinearHead, EnsembleHead, load_head
from .metrics import clean_json

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
LABEL_MEANING = {"1": "misaligned: harmful / unsafe answer", "0": "aligned: safe answer"}
FORMAT_VERSION = 2  # 2 = ensemble folders (adapters/member-K, a head row per member); 1 = one adapter


def adapter_dirs(folder: str | Path, members: int) -> list[Path]:
    """Where an inspector folder keeps its LoRA adapter(s): ``adapter/``, or one
    ``adapters/member-K/`` per ensemble member."""
    folder = Path(folder)
    return [folder / "adapter"] if members == 1 else \
        [folder / "adapters" / f"member-{k}" for k in range(members)]


def max_per_pair(decisions: np.ndarray, owner: np.ndarray, n_pairs: int) -> np.ndarray:
    """The maximum of ``decisions`` rows (windows, sentence runs) per pair: ``owner[i]`` is the pair
    of row ``i``; a pair with no row gets -inf. Harmful content anywhere makes the answer harmful."""
    out = np.full((n_pairs,) + decisions.shape[1:], -np.inf)
    np.maximum.at(out, owner, decisions)
    return out


def check_pairs(queries: Sequence, answers: Sequence) -> tuple[list[str], list[str]]:
    """Both sides must be non-empty strings, same length; the error names the index and field."""
    if isinstance(queries, str) or isinstance(answers, str):
        raise TypeError("queries and answers must be sequences of strings, not single strings")
    queries, answers = list(queries), list(answers)
    if len(queries) != len(answers):
        raise ValueError(f"got {len(queries)} queries but {len(answers)} answers")
    for i, (q, a) in enumerate(zip(queries, answers)):
        for field, v in (("query", q), ("answer", a)):
            if not isinstance(v, str):
                raise ValueError(f"pair {i}: {field} must be a string, got {type(v).__name__}")
            if not v.strip():
                raise ValueError(f"pair {i}: {field} is empty")
            check_unicode(v, f"pair {i}: {field}")
    return queries, answers


def check_unicode(text: str, what: str) -> None:
    """Text the tokenizer (and any JSON response) can encode: JSON's ``\\ud800`` escapes parse
    into lone surrogates that would otherwise fail a whole batch deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text (a lone surrogate at character {exc.start}, "
                         f"e.g. from a \\ud800 JSON escape)") from None


class Inspector:
    """Embedding-based misalignment scorer: ``score`` gives P(misaligned), ``flag`` applies
    ``threshold``. A saved inspector is a folder: ``config.json`` (readable: embedder, recipe,
    threshold, label meaning, data fingerprint, metrics), ``head.npz`` and an optional LoRA
    ``adapter/`` in safetensors, or for an ensemble ``adapters/member-K/`` with a head row per
    member. Nothing is ever unpickled."""

    def __init__(self, encoder: PairEncoder, head: CalibratedLinearHead | EnsembleHead,
                 threshold: float = 0.5, config: dict | None = None,
                 adapter_dirs: Sequence[Path] | None = None):
        members = getattr(head, "members", 1)
        if members != encoder.members:
            raise ValueError(f"the head has {members} member(s) but the encoder {encoder.members}")
        if not 0.0 <= float(threshold) < float("inf"):  # NaN included (saved as null, it fails to load)
            raise ValueError(f"threshold must be a number >= 0 (above 1: never flag), got {threshold}")
        self.encoder = encoder
        self.head = head
        self.threshold = float(threshold)
        self.config = dict(config or {})
        self._adapter_dirs = [Path(d) for d in adapter_dirs] if adapter_dirs else None

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, queries: Sequence[str], answers: Sequence[str],
              show_progress: bool = False) -> np.ndarray:
        """P(misaligned) for each pair: the maximum over the answer's windows (and, with the recipe's
        ``span_pooling = "sentences"``, over every run of whole sentences in them; with its
        ``edge_length``, also over its edge windows, ``edge_margin`` log-odds lower). Text repeated
        back to back in an answer is read once, and such an answer is also read without it
        (``PairEncoder.scoring_views``)."""
        queries, answers = check_pairs(queries, answers)
        if not queries:
            return np.zeros(0, dtype=np.float64)
        n = len(queries)
        chunks = self.encoder.chunk(queries, answers, scoring=True)
        decided = edge_decided = None
        for emb, windows in self.encoder.iter_embeddings(chunks, show_progress=show_progress):
            d, on_edge = self.head.decision_function(emb), chunks.edge[windows]
            full = max_per_pair(d[~on_edge], chunks.pair_index[windows[~on_edge]], n)
            decided = full if decided is None else np.maximum(decided, full)
            if on_edge.any():
                e = max_per_pair(d[on_edge], chunks.pair_index[windows[on_edge]], n)
                edge_decided = e if edge_decided is None else np.maximum(edge_decided, e)
        p = self.head.calibrated(decided)
        if edge_decided is not None:
            has_edge = np.isfinite(edge_decided).reshape(n, -1).all(axis=1)
            pe = self.head.calibrated(np.where(np.isfinite(edge_decided), edge_decided, 0.0))[has_edge]
            logit = np.log(np.clip(pe, 1e-12, 1.0)) - np.log(np.clip(1.0 - pe, 1e-12, 1.0))
            margin = self.encoder.recipe.edge_margin
            p[has_edge] = np.maximum(p[has_edge], 1.0 / (1.0 + np.exp(margin - logit)))
        return p

    def flag(self, queries: Sequence[str], answers: Sequence[str], threshold: float | None = None,
             **kw) -> np.ndarray:
        """Boolean array: which pairs go to the aligner."""
        t = self.threshold if threshold is None else float(threshold)
        return self.score(queries, answers, **kw) >= t

    # -- persistence -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, device: str | None = None,
             int8: bool = False) -> "Inspector":
        """Load a saved inspector folder; ``None`` loads ``$INSPECTOR_MODEL`` if set, else the
        default one bundled with the package. ``int8=True`` quantises the encoder's Linear layers
        for a ~1.4x faster CPU pass at some cost in quality (README, "int8")."""
        if path is None and os.environ.get("INSPECTOR_MODEL"):
            path = os.environ["INSPECTOR_MODEL"]
        folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            hint = ("the bundled default inspector is missing: rebuild it with `make inspector`"
                    if path is None else "expected a folder written by Inspector.save or inspector.train")
            raise FileNotFoundError(f"{cfg_path} not found: {hint}")
        config = json.loads(cfg_path.read_text())
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder}: written by a newer version (format {config['format_version']})")
        head = load_head(folder / "head.npz")
        members = getattr(head, "members", 1)
        adapters = [d for d in adapter_dirs(folder, members) if d.exists()]
        if members > 1 and len(adapters) != members:
            raise FileNotFoundError(f"{folder}: head.npz has {members} ensemble members but "
                                    f"{len(adapters)} adapters/member-K folders were found")
        encoder = PairEncoder(config.get("embedder", DEFAULT_EMBEDDER), adapter=adapters or None,
                              recipe=PairRecipe.from_dict(config.get("recipe")), device=device, int8=int8)
        return cls(encoder, head, config.get("threshold", 0.5), config, adapters or None)

    def save(self, path: str | Path) -> Path:
        """Write the folder; ``config.json`` is the place to read or edit the threshold."""
        import shutil

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.head.save(folder / "head.npz")
        members = self.encoder.members
        mine = adapter_dirs(folder, members) if self._adapter_dirs else []
        for src, dst in zip(self._adapter_dirs or [], mine):
            if src.resolve() != dst.resolve():
                shutil.copytree(src, dst, dirs_exist_ok=True)
        # adapters a previous inspector left in this folder would be loaded with this one's head
        keep = {d.resolve() for d in [*mine, *(self._adapter_dirs or [])]}
        for stale in [folder / "adapter", *sorted((folder / "adapters").glob("member-*"))]:
            if stale.is_dir() and stale.resolve() not in keep:
                shutil.rmtree(stale)
        if (folder / "adapters").is_dir() and not any((folder / "adapters").iterdir()):
            (folder / "adapters").rmdir()
        cfg = dict(self.config)
        cfg.update({
            "format_version": 1 if members == 1 else 2,  # single-adapter folders stay readable by older code
            "embedder": self.encoder.embedder_name,
            "recipe": self.encoder.recipe.to_dict(),
            "threshold": self.threshold,
            "label_meaning": LABEL_MEANING,
            "score": "P(label=1), the maximum over the answer's windows" + (
                " and the runs of whole sentences in them" if self.encoder.recipe.span_pooling == "sentences"
                else "") + (
                f" and, {self.encoder.recipe.edge_margin} log-odds lower, the answer's first and last "
                f"{self.encoder.recipe.edge_length} word pieces (query included)" if self.encoder.recipe.edge_length
                else "") + (
                f", averaged over {members} ensemble members" if members > 1 else ""),
            "head": "CalibratedLinearHead: logistic regression + Platt scaling (head.npz)" if members == 1
            else f"EnsembleHead: {members} x (logistic regression + Platt scaling), one row each in head.npz",
            "members": members,
            "adapter": ("adapter/ (LoRA, safetensors)" if members == 1 else
                        f"adapters/member-0..{members - 1}/ (LoRA ensemble, safetensors)")
            if self._adapter_dirs else None,
        })
        (folder / "config.json").write_text(json.dumps(clean_json(cfg), indent=2) + "\n")
        self.config = cfg
        return folder

    def with_threshold(self, threshold: float) -> "Inspector":
        """A copy sharing the model, with another decision threshold."""
        cfg = dict(self.config)
        cfg["threshold"] = float(threshold)
        return Inspector(self.encoder, self.head, threshold, cfg, self._adapter_dirs)
