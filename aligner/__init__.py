"""Aligner: rewrite flagged chatbot answers with a small correction model (Ji et al., 2024).

``Aligner.load(id_or_path)`` takes any Hugging Face causal LM or encoder-decoder checkpoint;
``python -m aligner.train`` fine-tunes one with identity warm-up; ``python -m aligner.evaluate``
measures it. What is shown when no usable correction exists (the fallback policy) is the
pipeline's decision: ``pipeline.routing``.
"""
from __future__ import annotations

from pathlib import Path

from .results import CorrectionResult, Reason
from .template import DEFAULT_TEMPLATE


def __getattr__(name: str):
    """The model classes import torch + transformers (seconds); load them only when asked for,
    so the result types stay cheap to import (e.g. in the Serve ingress)."""
    if name in ("Aligner", "detect_degenerate"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'aligner' has no attribute {name!r}")

#: Where ``make aligner`` writes the small CPU-trained aligner (relative to the repo root / cwd).
DEFAULT_ALIGNER_DIR = Path("models/aligner-small")
_REPO_ROOT = Path(__file__).resolve().parents[1]

HOW_TO_GET_DEFAULT = ("no aligner model found at models/aligner-small: run `make aligner` "
                      "(about 30 min on 2 CPU cores) or name a checkpoint (id or path) in the config")


def is_loadable_model_dir(path: Path) -> bool:
    """Cheap check (no loading): a config, weights and the aligner config are all there."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "aligner_config.json").is_file():
        return False
    return any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                              "pytorch_model.bin"))


def find_default_aligner() -> Path | None:
    """``models/aligner-small`` under the cwd or the repo root if it holds a model, else None."""
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = base / DEFAULT_ALIGNER_DIR
        if is_loadable_model_dir(candidate):
            return candidate
    return None


__all__ = ["Aligner", "CorrectionResult", "DEFAULT_TEMPLATE", "DEFAULT_ALIGNER_DIR", "HOW_TO_GET_DEFAULT",
           "Reason", "detect_degenerate", "find_default_aligner", "is_loadable_model_dir"]
