"""Embedding-based inspector: decides which (query, answer) pairs need the aligner."""
from .model import DEFAULT_MODEL_DIR, Inspector, check_pairs, check_unicode

__all__ = ["Inspector", "DEFAULT_MODEL_DIR", "check_pairs", "check_unicode"]
