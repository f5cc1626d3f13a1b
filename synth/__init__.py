"""Synthetic alignment data from principles and demonstrations (after Ngweta et al. 2024).

For each query an LLM writes a misaligned answer, then a critique and a corrected answer; filters
drop duplicates, near duplicates, malformed/cut-off/off-language/over-long output and corrections
that barely differ from the answer. Output feeds ``inspector.train`` and ``aligner.train``.
"""
from .backends import Backend, BackendError, GenParams, Generation, HFBackend, OpenAIBackend, make_backend
from .criteria import Criterion, CriterionError, list_criteria, load_criterion
from .filters import Embedder
from .generate import GenerateConfig, Interrupted, export, generate, training_rows
from .prompts import PROMPT_VERSION

__all__ = ["Backend", "BackendError", "Criterion", "CriterionError", "Embedder", "GenParams",
           "GenerateConfig", "Generation", "HFBackend", "Interrupted", "OpenAIBackend",
           "PROMPT_VERSION", "export", "generate", "list_criteria", "load_criterion",
           "make_backend", "training_rows"]
