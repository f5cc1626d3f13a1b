"""What the Inspector and Aligner deployments run on a batch, without Ray: each loads its model
once and answers every pair of a batch; neither raises for one bad pair."""
from __future__ import annotations

from typing import Sequence

from aligner.results import CorrectionResult, Reason

from .core import InspectorScorer, PairScore


class InspectorService:
    """The inspector as its deployment runs it: validates each pair, scores the valid ones in one
    call, and answers every pair (an invalid one gets an error, never fails the others)."""

    def __init__(self, path: str | None = None, torch_threads: int | None = None, int8: bool = False):
        from inspector import Inspector

        _set_threads(torch_threads)
        self.path = path
        self.inspector = Inspector.load(path, int8=int8)

    @property
    def threshold(self) -> float:
        return float(self.inspector.threshold)

    def info(self) -> dict:
        cfg = self.inspector.config
        return {"threshold": self.threshold, "path": self.path or "bundled default",
                "embedder": cfg.get("embedder"), "members": self.inspector.encoder.members,
                "int8": self.inspector.encoder.int8}

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[PairScore]:
        """One ``PairScore`` per pair; a pair that fails (invalid, or the model raises on it) fails
        alone (``pipeline.core.InspectorScorer``, what the batch job scores with)."""
        return InspectorScorer(self.inspector).score_pairs([p[0] for p in pairs], [p[1] for p in pairs])


class AlignerService:
    """The aligner as its deployment runs it: one ``correct_detailed`` call per batch, with the
    configured generation settings and deadline; never raises (a failure is a failed result)."""

    def __init__(self, id_or_path: str, device: str = "auto", generation: dict | None = None,
                 timeout_s: float | None = None, batch_size: int = 8, torch_threads: int | None = None):
        from aligner import Aligner

        _set_threads(torch_threads)
        self.id_or_path = id_or_path
        self.aligner = Aligner.load(id_or_path, device=device)
        self.generation = dict(generation or {})
        self.aligner.check_generation(self.generation)  # bad values fail the replica's start, not requests
        self.timeout_s = timeout_s
        self.batch_size = batch_size

    def info(self) -> dict:
        return {"model": self.id_or_path, "device": str(self.aligner.device),
                "max_new_tokens": self.generation.get("max_new_tokens", self.aligner.max_new_tokens)}

    def correct_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[CorrectionResult]:
        if not pairs:
            return []
        try:
            return self.aligner.correct_detailed([p[0] for p in pairs], [p[1] for p in pairs],
                                                 batch_size=self.batch_size, timeout_s=self.timeout_s,
                                                 **self.generation)
        except Exception as exc:  # noqa: BLE001 - the rows get the fallback, the replica stays up
            msg = f"aligner error: {type(exc).__name__}: {exc}"[:500]
            return [CorrectionResult.failed(Reason.ALIGNER_ERROR, msg) for _ in pairs]


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)
