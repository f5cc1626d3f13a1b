"""The one moderation core (``pipeline.core``): the batch job and the Serve flow run it, so the same
pairs get the same results, with per-pair failure isolation, re-inspection and the fallback policy;
and importing the packages changes nothing (no torch in the ingress, no process-wide offline mode)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from aligner.results import CorrectionResult, Reason
from conftest import REPO_ROOT
from pipeline.batch import run_batch
from pipeline.core import ModerationPipeline
from pipeline.routing import STILL_FLAGGED, PipelineConfig
from pipeline.flow import ModerationFlow
from pipeline.services import AlignerService, InspectorService
from pipeline.settings import ServeSettings

# (query, answer): what each answer does in the fakes below
PAIRS = [
    ("q0", "a harmless answer"),            # not flagged
    ("q1", "bad: fixable"),                 # flagged, corrected, the correction passes re-inspection
    ("q2", "boom: the model fails on it"),  # the inspector raises on this pair alone
    ("q3", "bad: stubborn"),                # corrected, but the correction is still flagged
    ("q4", "bad: degenerate"),              # the aligner's output is unusable
    ("q5", "bad: rescored"),                # corrected; the inspector fails re-scoring the correction
]


class FakeInspector:
    """Scores 0.9 for text with 'bad', 0.1 otherwise; raises on any batch holding 'boom'."""

    threshold = 0.5

    def __init__(self):
        self.calls = 0

    def score(self, queries, answers):
        self.calls += 1
        if any("boom" in a for a in answers):
            raise RuntimeError("tokenizer exploded")
        return [0.9 if "bad" in a else 0.1 for a in answers]


class FakeAligner:
    def correct_detailed(self, queries, answers, **generation):
        out = []
        for a in answers:
            if "fixable" in a:
                out.append(CorrectionResult("a safe rewrite", True))
            elif "stubborn" in a:
                out.append(CorrectionResult("still bad", True))
            elif "rescored" in a:
                out.append(CorrectionResult("fine, but boom", True))
            else:
                out.append(CorrectionResult("x x x x", False, "runaway repetition", reason=Reason.DEGENERATE))
        return out


def _services():
    """The Serve deployments' sync services over the fakes (what the Inspector / Aligner replicas run)."""
    insp = InspectorService.__new__(InspectorService)
    insp.inspector, insp.path = FakeInspector(), None
    al = AlignerService.__new__(AlignerService)
    al.aligner, al.generation, al.timeout_s, al.batch_size, al.id_or_path = FakeAligner(), {}, None, 8, "fake"
    return insp, al


def _flow(policy: str) -> ModerationFlow:
    insp, al = _services()

    async def score(q, a):
        return insp.score_pairs(list(zip(q, a)))

    async def correct(q, a):
        return al.correct_pairs(list(zip(q, a)))

    async def threshold():
        return 0.5

    return ModerationFlow(ServeSettings(fallback=policy, refusal_text="No."), score, correct, threshold)


def _comparable(m) -> dict:
    d = m.to_dict()
    d["timings_ms"] = sorted(d["timings_ms"])  # the keys, not the clock
    return d


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_batch_and_serve_give_identical_results(policy, tmp_path):
    q, a = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    config = PipelineConfig(threshold=0.5, fallback=policy, refusal_text="No.")
    batch = ModerationPipeline(FakeInspector(), FakeAligner(), config).moderate(q, a)
    flow = _flow(policy)
    served = asyncio.run(flow.moderate(q, a))
    assert [_comparable(m) for m in batch] == [_comparable(m) for m in served]

    by = dict(zip(q, batch))
    assert by["q0"].fallback is None and not by["q0"].flagged and by["q0"].answer == a[0]
    assert by["q1"].corrected and by["q1"].answer == "a safe rewrite" and by["q1"].corrected_score == 0.1
    # one pair the model fails on fails alone
    assert by["q2"].error == "the inspector failed on this pair: RuntimeError: tokenizer exploded"
    assert by["q2"].score is None and not by["q2"].flagged
    # a still-flagged correction gets the fallback, with the typed reason
    assert by["q3"].reason is Reason.STILL_FLAGGED and by["q3"].problem.startswith(STILL_FLAGGED)
    assert by["q3"].fallback == policy and not by["q3"].corrected and by["q3"].corrected_score is None
    assert by["q4"].reason is Reason.DEGENERATE and by["q4"].problem == "runaway repetition"
    shown = "No." if policy == "fail_closed" else None
    for k in ("q3", "q4"):
        assert by[k].answer == (shown or dict(PAIRS)[k])
    # a failed re-inspection keeps the correction, unscored
    assert by["q5"].corrected and by["q5"].answer == "fine, but boom" and by["q5"].corrected_score is None
    for m in batch:
        assert set(m.timings_ms) == {"inspector_ms", "aligner_ms", "reinspect_ms", "total_ms"}
    assert flow.metrics.totals["errors"] == 2  # the unscored pair, the failed re-inspection
    assert flow.metrics.totals[("fallbacks", ("endpoint", "moderate"), ("policy", policy),
                                ("reason", "still_flagged"))] == 1

    # the batch job: the failing pair is an error row, its chunk's other rows are moderated
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"query": x, "answer": y}) + "\n" for x, y in PAIRS))
    summary = run_batch(src, out, ModerationPipeline(FakeInspector(), FakeAligner(), config), show_progress=False)
    rows = [json.loads(line) for line in out.open()]
    assert summary.errors == 1 and summary.scored == 5 and summary.flagged == 4 and summary.corrected == 2
    assert rows[2]["error"] == "row 3: scoring failed: the inspector failed on this pair: RuntimeError: tokenizer exploded"
    for row, m in zip(rows, served):
        if m.error is None:
            assert row["error"] is None
            assert (row["inspector_score"], row["flagged"], row["corrected_answer"], row["corrected_score"],
                    row["fallback"]) == (m.score, m.flagged, m.corrected_answer, m.corrected_score, m.fallback)


def test_the_aligner_raising_or_missing_gives_typed_fallbacks():
    q, a = ["q"], ["bad answer"]

    class Raises:
        def correct_detailed(self, *args, **kw):
            raise RuntimeError("CUDA out of memory")

    config = PipelineConfig(threshold=0.5)
    m = ModerationPipeline(FakeInspector(), Raises(), config).moderate(q, a)[0]
    assert m.reason is Reason.ALIGNER_ERROR and "CUDA out of memory" in m.problem and m.answer == a[0]
    m = ModerationPipeline(FakeInspector(), None, config).moderate(q, a)[0]
    assert m.reason is Reason.NO_ALIGNER and m.problem == "no aligner configured"


def test_moderate_runs_inside_a_running_event_loop():
    """A notebook's kernel has a running loop: the sync pipeline still works there."""
    async def inside():
        return ModerationPipeline(FakeInspector()).moderate(["q"], ["fine"])

    assert asyncio.run(inside())[0].score == 0.1


def test_imports_change_nothing():
    """``import pipeline.serve`` (what every Serve replica imports) loads no torch, and importing the
    packages does not switch the process to offline mode: the entry points decide that."""
    code = ("import os, sys\n"
            "import inspector, aligner, pipeline.serve, pipeline.batch\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'HF_HUB_OFFLINE' not in os.environ, 'HF_HUB_OFFLINE set on import'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_entry_points_set_offline_mode(monkeypatch):
    from pipeline.env import offline_by_default

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_by_default()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's own choice wins
    offline_by_default()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
