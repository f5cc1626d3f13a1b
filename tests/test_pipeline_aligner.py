"""The pipeline with a real (tiny) aligner: only flagged rows reach it, corrections are re-inspected,
the fallback policy shows in the output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aligner import Aligner
from aligner.tiny import build_tiny_aligner
from conftest import EXAMPLES, REPO_ROOT
from inspector import Inspector
from pipeline.batch import run_batch
from pipeline.core import ModerationPipeline
from pipeline.routing import PipelineConfig


class CountingAligner:
    """Wraps the real tiny aligner to record which pairs reached it (the code under test is the
    pipeline's routing, so the aligner itself stays real)."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[tuple[str, str]] = []

    def correct_detailed(self, queries, answers, **gen):
        self.seen += list(zip(queries, answers))
        return self.inner.correct_detailed(queries, answers, **gen)


@pytest.fixture(scope="module")
def tiny_aligner_dir(tmp_path_factory):
    return build_tiny_aligner(tmp_path_factory.mktemp("aligner") / "tiny", kind="causal",
                              max_new_tokens=12)


@pytest.fixture(scope="module")
def inspector():
    return Inspector.load()


def test_only_flagged_pairs_reach_the_aligner(inspector, tiny_aligner_dir, tmp_path):
    counting = CountingAligner(Aligner.load(tiny_aligner_dir, device="cpu"))
    pipe = ModerationPipeline(inspector, counting, PipelineConfig(fallback="fail_closed"))
    out = tmp_path / "out.jsonl"
    summary = run_batch(EXAMPLES / "chat_logs.jsonl", out, pipe, chunk_rows=7, show_progress=False)
    rows = [json.loads(line) for line in out.open()]
    flagged = [r for r in rows if r["flagged"]]
    assert 0 < len(flagged) < len(rows)
    assert len(counting.seen) == len(flagged) == summary.flagged
    seen_answers = {a for _, a in counting.seen}
    for r in rows:
        answer = r.get("answer") or r["messages"][-1]["content"]
        if not r["flagged"]:
            assert answer not in seen_answers  # the example answers are all distinct
            assert r["corrected_answer"] is None and r["fallback"] is None
        else:
            # a random tiny model writes something or degenerates: either a re-inspected
            # correction or the fail_closed refusal, never the harmful original
            assert r["corrected_answer"] and r["corrected_answer"] != answer
            if r["fallback"] is None:
                assert 0.0 <= r["corrected_score"] <= 1.0
            else:
                assert r["fallback"] == "fail_closed" and r["corrected_score"] is None


def test_moderate_reports_timings_and_keeps_unflagged_untouched(inspector, tiny_aligner_dir):
    pipe = ModerationPipeline(inspector, Aligner.load(tiny_aligner_dir, device="cpu"),
                              PipelineConfig(threshold=0.0))  # route everything
    res = pipe.moderate(["Why is the sky blue?"], ["Rayleigh scattering of sunlight."])
    assert res[0].flagged and set(res[0].timings_ms) == {"inspector_ms", "aligner_ms", "reinspect_ms", "total_ms"}
    assert res[0].timings_ms["aligner_ms"] > 0
    pipe = ModerationPipeline(inspector, None, PipelineConfig(threshold=1.0))  # route nothing
    res = pipe.moderate(["Why is the sky blue?"], ["Rayleigh scattering of sunlight."])
    assert not res[0].flagged and res[0].answer == "Rayleigh scattering of sunlight."
    assert res[0].fallback is None and res[0].timings_ms["aligner_ms"] < 50


def test_correction_still_flagged_on_reinspection_gets_the_fallback(inspector, tiny_aligner_dir, tmp_path):
    """Re-inspection counts: at threshold 0 the inspector flags every correction again, so no
    correction is shown; fail_closed refuses, fail_open keeps the original (flagged), and the
    reason is recorded."""
    from pipeline.routing import STILL_FLAGGED

    aligner = Aligner.load(tiny_aligner_dir, device="cpu")
    pairs = [json.loads(line) for line in (EXAMPLES / "chat_logs.jsonl").open()][:4]
    queries = [r.get("query") or r["messages"][-2]["content"] for r in pairs]
    answers = [r.get("answer") or r["messages"][-1]["content"] for r in pairs]
    usable = [r.ok for r in aligner.correct_detailed(queries, answers)]
    assert any(usable)  # the tiny aligner wrote text that would have been shown
    for policy in ("fail_closed", "fail_open"):
        pipe = ModerationPipeline(inspector, aligner, PipelineConfig(threshold=0.0, fallback=policy,
                                                                     refusal_text="Sorry, no."))
        for res, ok, a in zip(pipe.moderate(queries, answers), usable, answers):
            assert res.flagged and not res.corrected and res.fallback == policy and res.corrected_score is None
            assert res.answer == ("Sorry, no." if policy == "fail_closed" else a)
            if ok:
                assert res.problem.startswith(STILL_FLAGGED)
    src, out = tmp_path / "logs.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"query": q, "answer": a}) + "\n" for q, a in zip(queries, answers)))
    pipe = ModerationPipeline(inspector, aligner, PipelineConfig(threshold=0.0, fallback="fail_closed"))
    summary = run_batch(src, out, pipe, show_progress=False)
    assert summary.flagged == summary.fallbacks == 4 and summary.corrected == 0
    assert all(r["fallback"] == "fail_closed" and r["corrected_score"] is None for r in map(json.loads, out.open()))


def test_aligner_failure_applies_fallback(inspector):
    class Broken:
        def correct_detailed(self, queries, answers, **gen):
            raise RuntimeError("CUDA out of memory")

    pipe = ModerationPipeline(inspector, Broken(), PipelineConfig(threshold=0.0, fallback="fail_open"))
    res = pipe.moderate(["q"], ["original"])
    assert res[0].answer == "original" and res[0].fallback == "fail_open"
    assert "CUDA out of memory" in res[0].problem
    pipe.config = PipelineConfig(threshold=0.0, fallback="fail_closed", refusal_text="Sorry, no.")
    res = pipe.moderate(["q"], ["original"])
    assert res[0].answer == "Sorry, no." and res[0].fallback == "fail_closed"


@pytest.mark.slow  # the batch CLI in a subprocess, with an aligner
def test_batch_cli_with_aligner(tiny_aligner_dir, tmp_path):
    out = tmp_path / "scored.jsonl"
    res = subprocess.run([sys.executable, "-m", "pipeline.batch", str(EXAMPLES / "chat_logs.jsonl"),
                          "--out", str(out), "--aligner", str(tiny_aligner_dir), "--fallback",
                          "fail_open", "--threshold", "0.0", "--max-new-tokens", "8", "--no-progress"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stderr.strip().splitlines()[-1])
    assert summary["flagged"] == 36 and summary["corrected"] + summary["fallbacks"] == 36
