"""Aligner inference, prompt handling, fallbacks and data loading, on tiny models built here."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from aligner import (DEFAULT_TEMPLATE, Aligner, CorrectionResult, Reason, detect_degenerate, find_default_aligner,
                     is_loadable_model_dir)
from aligner.data import load_rows, split_by_query, text_key
from aligner.template import SHORTEN_MARKER, build_prompt
from aligner.tiny import build_tiny_checkpoint
from aligner.train import IGNORE, collate, encode_example
from pipeline.core import correct_flagged
from pipeline.routing import DEFAULT_REFUSAL, FALLBACK_POLICIES, apply_fallback

QUERIES = ["How do I bake bread?", "hi",
           "What is the capital of France, and what is it famous for in art and history?"]
ANSWERS = ["Mix flour, water, salt and yeast, knead, let it rise and bake at 220 C for 30 minutes.",
           "hello there", "Paris. " * 30]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {k: build_tiny_checkpoint(base / k, k, seed=1) for k in ("causal", "seq2seq")}


@pytest.fixture(scope="module")
def causal(tiny_dirs):
    return Aligner.load(tiny_dirs["causal"], device="cpu", max_new_tokens=12, max_input_tokens=96)


@pytest.fixture(scope="module")
def seq2seq(tiny_dirs):
    return Aligner.load(tiny_dirs["seq2seq"], device="cpu", max_new_tokens=12, max_input_tokens=96)


def test_default_template_is_the_released_checkpoints_prompt():
    assert DEFAULT_TEMPLATE == ("BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair "
                                "to make it more helpful and harmless: {question} | {answer} ASSISTANT:")
    assert FALLBACK_POLICIES == ("fail_open", "fail_closed")


def test_load_detects_model_kind_from_config(causal, seq2seq):
    assert not causal.is_encoder_decoder and type(causal.model).__name__ == "GPT2LMHeadModel"
    assert seq2seq.is_encoder_decoder and type(seq2seq.model).__name__ == "EncoderDecoderModel"
    assert causal.template == DEFAULT_TEMPLATE
    # causal models keep room for the new tokens inside their positions
    assert causal.max_input_tokens == 96 and causal.tokenizer.padding_side == "left"


def test_encoder_only_checkpoint_is_refused_with_advice():
    from inspector.encoder import resolve_embedder

    with pytest.raises(ValueError, match="without a text-generation head; an aligner must be .*aligner.train --base"):
        Aligner.load(resolve_embedder(None), device="cpu")


def test_prompt_uses_template_and_shortens_long_answers_in_the_middle(causal):
    tok = causal.tokenizer
    q = "How should I store fresh basil?"
    a = "START " + " ".join(f"word{i}" for i in range(400)) + " END"
    built = build_prompt(tok, DEFAULT_TEMPLATE, q, a, max_tokens=80)
    assert built.shortened and built.n_tokens <= 80
    assert len(tok(built.prompt)["input_ids"]) <= 80
    assert built.prompt.startswith("BEGINNING OF CONVERSATION: USER: Edit the following")
    assert f": {q} | START" in built.prompt          # question kept whole, answer head kept
    assert built.prompt.endswith("END ASSISTANT:")   # answer tail and the cue kept
    assert SHORTEN_MARKER.strip() in built.prompt
    short = build_prompt(tok, DEFAULT_TEMPLATE, q, "Keep it in water.", max_tokens=80)
    assert not short.shortened and short.prompt == DEFAULT_TEMPLATE.format(question=q, answer="Keep it in water.")


def test_overlong_question_is_cut_too_but_never_crashes(causal):
    q = "Human: " + " ".join(f"turn{i}" for i in range(600)) + " final question?"
    a = "An answer " * 300
    built = build_prompt(causal.tokenizer, DEFAULT_TEMPLATE, q, a, max_tokens=96)
    assert built.shortened and built.n_tokens <= 96
    assert "final question?" in built.prompt and "An answer" in built.prompt
    res = causal.correct_detailed([q], [a])
    assert len(res) == 1 and "input shortened" in res[0].notes
    if res[0].ok:  # a note, not a failure
        assert "input shortened" in res[0].problem


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_batched_generation_matches_one_by_one(kind, causal, seq2seq):
    al = causal if kind == "causal" else seq2seq
    batched = al.correct_detailed(QUERIES, ANSWERS, batch_size=3)
    single = [al.correct_detailed([q], [a], batch_size=1)[0] for q, a in zip(QUERIES, ANSWERS)]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.new_tokens for r in batched] == [r.new_tokens for r in single]
    assert all(0 < r.new_tokens <= 12 for r in batched)
    # the output never echoes the prompt: only new text comes back
    assert not any("BEGINNING OF CONVERSATION" in r.text for r in batched)
    assert al.correct(QUERIES, ANSWERS, batch_size=2) == [r.text for r in batched]


def _oom_above(model, monkeypatch, max_rows: int) -> list[int]:
    """Make ``model.generate`` run out of GPU memory on batches of more than ``max_rows`` rows;
    returns the batch sizes it was called with."""
    real, sizes = model.generate, []

    def generate(input_ids, **kw):
        sizes.append(len(input_ids))
        if len(input_ids) > max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(input_ids=input_ids, **kw)

    monkeypatch.setattr(model, "generate", generate)
    return sizes


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_out_of_memory_halves_the_batch_and_retries(kind, causal, seq2seq, monkeypatch):
    al = causal if kind == "causal" else seq2seq
    want = al.correct_detailed(QUERIES, ANSWERS, batch_size=3)
    sizes = _oom_above(al.model, monkeypatch, 1)
    got = al.correct_detailed(QUERIES, ANSWERS, batch_size=3)
    assert sizes == [3, 1, 2, 1, 1]  # 3 -> 1 + 2 -> 1 + 1
    assert [(r.text, r.ok, r.new_tokens) for r in got] == [(r.text, r.ok, r.new_tokens) for r in want]
    monkeypatch.undo()
    _oom_above(al.model, monkeypatch, 0)  # not even one prompt fits: that prompt fails, alone
    res = al.correct_detailed(QUERIES[:2], ANSWERS[:2], batch_size=2)
    assert [r.problem for r in res] == ["generation error: out of GPU memory"] * 2
    assert all(r.reason is Reason.ALIGNER_ERROR and not r.ok for r in res)


def test_left_padding_logits_match_unpadded(causal):
    ids_a, _ = causal.prompt_ids(QUERIES[0], ANSWERS[0])
    ids_b, _ = causal.prompt_ids(QUERIES[1], ANSWERS[1])
    assert len(ids_a) != len(ids_b)
    ids, mask = causal._pad([ids_a, ids_b])
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padded
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = causal.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        alone = causal.model(input_ids=torch.tensor([ids_b])).logits[:, -1]
    assert torch.allclose(batched[1], alone[0], atol=1e-4)


def test_save_load_round_trip_keeps_template_limits_and_outputs(tmp_path, tiny_dirs):
    template = "Fix this. Q: {question} A: {answer} Better:"
    al = Aligner.load(tiny_dirs["seq2seq"], device="cpu", template=template, max_new_tokens=7,
                      max_input_tokens=64, generation={"no_repeat_ngram_size": 2})
    before = al.correct(QUERIES, ANSWERS)
    out = al.save(tmp_path / "saved", recipe={"note": "test"})
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    cfg = json.loads((out / "aligner_config.json").read_text())
    assert cfg["template"] == template and cfg["max_new_tokens"] == 7 and cfg["recipe"] == {"note": "test"}
    again = Aligner.load(out, device="cpu")
    assert again.template == template and again.max_new_tokens == 7 and again.max_input_tokens == 64
    assert again.generation == {"no_repeat_ngram_size": 2}
    assert again.correct(QUERIES, ANSWERS) == before
    assert is_loadable_model_dir(out) and not is_loadable_model_dir(tiny_dirs["seq2seq"])


def test_bad_generation_settings_fail_at_load_with_the_option_named(tiny_dirs):
    # a typo, an option that returns several sequences, and a value generate() rejects all fail now,
    # not as a "generation error" on every later request
    with pytest.raises(ValueError, match="unknown generation option 'temprature'.*'temperature'"):
        Aligner.load(tiny_dirs["causal"], device="cpu", generation={"temprature": 0.7})
    with pytest.raises(ValueError, match="num_return_sequences=3 is not supported"):
        Aligner.load(tiny_dirs["seq2seq"], device="cpu", generation={"num_return_sequences": 3})
    with pytest.raises(ValueError, match="'input_ids' is set by the aligner"):
        Aligner.load(tiny_dirs["causal"], device="cpu", generation={"input_ids": [1, 2]})
    for kind in ("causal", "seq2seq"):
        with pytest.raises(ValueError, match=r"generation settings \{'num_beams': 0\} are rejected"):
            Aligner.load(tiny_dirs[kind], device="cpu", generation={"num_beams": 0})
    ok = Aligner.load(tiny_dirs["causal"], device="cpu", max_new_tokens=4,
                      generation={"do_sample": True, "top_p": 0.9, "temperature": 0.7})
    assert len(ok.correct(QUERIES[:1], ANSWERS[:1])) == 1
    # stop strings work from a JSON config: the aligner hands generate() its tokenizer
    stops = Aligner.load(tiny_dirs["causal"], device="cpu", max_new_tokens=4, generation={"stop_strings": ["."]})
    assert len(stops.correct(QUERIES[:2], ANSWERS[:2])) == 2


def test_unknown_generation_option_in_a_call_is_the_callers_error(causal):
    with pytest.raises(ValueError, match="unknown generation option 'max_new_token'"):
        causal.correct_detailed(QUERIES, ANSWERS, max_new_token=5)
    with pytest.raises(TypeError, match="lists of strings"):
        causal.correct("How?", "Like this.")  # not one correction per character


def test_bad_limits_and_a_corrupt_config_are_refused(tiny_dirs, tmp_path):
    for kw in ({"max_new_tokens": 0}, {"max_new_tokens": -5}, {"max_input_tokens": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a whole number >= 1"):
            Aligner.load(tiny_dirs["causal"], device="cpu", **kw)
    import shutil

    broken = shutil.copytree(tiny_dirs["causal"], tmp_path / "broken")
    (broken / "aligner_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="aligner_config.json: not valid JSON"):
        Aligner.load(broken, device="cpu")


def test_bad_template_is_rejected(tiny_dirs):
    with pytest.raises(ValueError, match=r"\{answer\}"):
        Aligner.load(tiny_dirs["causal"], device="cpu", template="Q: {question}")
    with pytest.raises(ValueError, match="only use the fields"):
        Aligner.load(tiny_dirs["causal"], device="cpu", template="{question} {answer} {other}")


def test_causal_loss_masks_prompt_tokens(causal):
    tok = causal.tokenizer
    q, a, c = "Can you help me?", "No.", "Yes, of course: tell me more."
    ex = encode_example(tok, DEFAULT_TEMPLATE, q, a, c, False, 96, 32)
    prompt_ids, _ = causal.prompt_ids(q, a)
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids            # training prompt == inference prompt
    assert ex["labels"][:n] == [IGNORE] * n             # no loss on the prompt
    assert ex["labels"][n:] == ex["input_ids"][n:]      # loss on every correction token
    assert ex["labels"][-1] == tok.sep_token_id         # ... which ends with EOS
    assert tok.decode(ex["labels"][n:-1]) == tok.decode(tok(c, add_special_tokens=False)["input_ids"])
    batch = collate([ex], tok.pad_token_id, False)
    with torch.no_grad():
        out = causal.model(**batch)
    logits = out.logits[0, n - 1:-1]
    manual = torch.nn.functional.cross_entropy(logits, torch.tensor(ex["labels"][n:]))
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_seq2seq_labels_hold_only_the_correction(seq2seq):
    tok = seq2seq.tokenizer
    ex = encode_example(tok, DEFAULT_TEMPLATE, "q?", "bad answer", "good answer.", True, 96, 32)
    assert ex["input_ids"] == seq2seq.prompt_ids("q?", "bad answer")[0]
    assert tok.decode(ex["labels"]) == "good answer. [SEP]"
    assert IGNORE not in ex["labels"]


def test_long_correction_is_cut_at_a_sentence_end(seq2seq):
    tok = seq2seq.tokenizer
    corr = "First sentence here. Second one is also fine. " + "third goes on and on " * 40
    ex = encode_example(tok, DEFAULT_TEMPLATE, "q", "a", corr, True, 96, 24)
    assert len(ex["labels"]) <= 24
    assert tok.decode(ex["labels"][:-1]).endswith("also fine.")


def test_degenerate_outputs_are_detected():
    assert detect_degenerate("") == "empty output"
    assert detect_degenerate("   ") == "empty output"
    assert detect_degenerate("I can help. " + "the the the " * 10) == "runaway repetition"
    assert detect_degenerate("ok " + "!" * 60) == "runaway repetition"
    assert detect_degenerate("I'm sorry, but I can't help with that. Please talk to a professional.") is None
    assert detect_degenerate(" ".join(f"w{i}" for i in range(60))) is None


def test_uncased_wordpiece_output_is_tidied(causal):
    raw = "i ' m sorry , but i can ' t help . it is important to respect people ' s privacy ."
    assert causal._clean(raw) == "I'm sorry, but I can't help. It is important to respect people's privacy."


def test_generation_detects_forced_repetition_and_empty_output(causal):
    tok_id = causal.tokenizer.convert_tokens_to_ids("bread")
    rep = causal.correct_detailed(["q"], ["a"], sequence_bias={(tok_id,): 50.0})[0]
    assert not rep.ok and rep.problem == "runaway repetition" and rep.new_tokens == 12
    empty = causal.correct_detailed(["q"], ["a"], sequence_bias={(causal.tokenizer.sep_token_id,): 50.0})[0]
    assert not empty.ok and empty.problem == "empty output" and empty.new_tokens == 1


def test_generation_error_or_timeout_fails_items_not_the_call(causal):
    bad = causal.correct_detailed(QUERIES, ANSWERS, num_beams=0)
    assert len(bad) == 3 and all(not r.ok and r.problem.startswith("generation error") for r in bad)
    late = causal.correct_detailed(QUERIES, ANSWERS, timeout_s=0)
    assert all(not r.ok and "timed out" in r.problem for r in late)
    assert all(r.reason is Reason.TIMEOUT and r.problem == "timed out after 0 s (not started)" for r in late)
    mixed = causal.correct_detailed(["fine", None], ["fine answer", "x"])
    assert mixed[1].ok is False and "must be strings" in mixed[1].problem and mixed[0].new_tokens > 0
    with pytest.raises(ValueError, match="2 queries but 1 answers"):
        causal.correct(["a", "b"], ["c"])


def test_apply_fallback_policies():
    good = CorrectionResult("a better answer", True, None, 4)
    assert apply_fallback("orig", good, "fail_open") == ("a better answer", None)
    assert apply_fallback("orig", good, "fail_closed") == ("a better answer", None)
    noted = CorrectionResult("shortened but fine", True, "input shortened", 3)
    assert apply_fallback("orig", noted, "fail_closed") == ("shortened but fine", None)
    for failed in (None, CorrectionResult("", False, "empty output"),
                   CorrectionResult("x x x", False, "runaway repetition")):
        assert apply_fallback("orig", failed, "fail_open") == ("orig", "fail_open")
        assert apply_fallback("orig", failed, "fail_closed") == (DEFAULT_REFUSAL, "fail_closed")
    with pytest.raises(ValueError, match="fail_open"):
        apply_fallback("orig", None, "ignore")


class RecordingAligner(Aligner):
    """A real tiny aligner that also records which pairs reached it."""

    def correct_detailed(self, queries, answers, **kw):
        self.seen = list(zip(queries, answers))
        return super().correct_detailed(queries, answers, **kw)


def test_only_flagged_rows_reach_the_aligner(tiny_dirs):
    al = RecordingAligner.load(tiny_dirs["causal"], device="cpu", max_new_tokens=6)
    qs = [f"question {i}" for i in range(5)]
    ans = [f"answer {i}" for i in range(5)]
    flags = [False, True, False, True, False]
    routed = correct_flagged(al, qs, ans, flags, policy="fail_closed")
    assert al.seen == [("question 1", "answer 1"), ("question 3", "answer 3")]
    assert [r.flagged for r in routed] == flags
    for i in (0, 2, 4):
        assert routed[i].text == ans[i] and not routed[i].corrected and routed[i].fallback_used is None
    direct = Aligner.correct_detailed(al, [qs[1], qs[3]], [ans[1], ans[3]])
    for i, d in zip((1, 3), direct):  # the correction, or the refusal where it was unusable
        r = routed[i]
        assert r.corrected == d.ok and r.fallback_used == (None if d.ok else "fail_closed")
        assert r.text == (d.text if d.ok else DEFAULT_REFUSAL) and r.text != ans[i]


def test_no_aligner_or_failing_aligner_applies_the_policy(tiny_dirs, causal):
    qs, ans, flags = ["q1", "q2"], ["a1", "a2"], [True, False]
    open_ = correct_flagged(None, qs, ans, flags, policy="fail_open")
    assert open_[0].text == "a1" and open_[0].fallback_used == "fail_open"
    assert open_[0].problem == "no aligner configured" and open_[1].fallback_used is None
    assert open_[0].reason is Reason.NO_ALIGNER and open_[1].reason is None
    closed = correct_flagged(None, qs, ans, flags, policy="fail_closed")
    assert closed[0].text == DEFAULT_REFUSAL and closed[1].text == "a2"
    broken = correct_flagged(causal, qs, ans, flags, policy="fail_closed", num_beams=0)
    assert broken[0].text == DEFAULT_REFUSAL and broken[0].problem.startswith("generation error")
    assert broken[0].reason is Reason.ALIGNER_ERROR

    class Raises:
        def correct_detailed(self, queries, answers, **gen):
            raise RuntimeError("CUDA out of memory")

    raised = correct_flagged(Raises(), qs, ans, flags)
    assert raised[0].reason is Reason.ALIGNER_ERROR and "CUDA out of memory" in raised[0].problem
    with pytest.raises(ValueError, match="lengths differ"):
        correct_flagged(None, qs, ans, [True])


def test_find_default_aligner_needs_a_complete_folder(tmp_path, monkeypatch, tiny_dirs):
    import aligner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(aligner, "_REPO_ROOT", tmp_path / "elsewhere")
    assert find_default_aligner() is None
    Aligner.load(tiny_dirs["causal"], device="cpu").save(tmp_path / "models" / "aligner-small")
    found = find_default_aligner()
    assert found is not None and found.resolve() == (tmp_path / "models" / "aligner-small").resolve()


# ----------------------------------------------------------------------------- data
def test_load_rows_reads_jsonl_csv_parquet(tmp_path):
    df = pd.DataFrame({"query": ["q1", "q2"], "answer": ["a1", "a2"], "correction": ["c1", "c2"],
                       "source": ["s", "s"]})
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        rows = load_rows(tmp_path / name)
        assert [(r.query, r.answer, r.correction, r.kind) for r in rows] == [
            ("q1", "a1", "c1", "correction"), ("q2", "a2", "c2", "correction")]


def test_csv_row_with_an_extra_field_is_an_error_not_a_shifted_row(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("query,answer,correction\nq1,a1,c1,x\nq2,a2,c2\n")
    with pytest.raises(ValueError, match=r"m.csv: line 2: 4 fields, but the header has 3"):
        load_rows(bad)
    good = tmp_path / "g.csv"
    good.write_text('query,answer,correction\n"q1, with a comma",a1,c1\n')
    assert load_rows(good)[0].query == "q1, with a comma"
    for name, text in (("bad.json", '[{"query": 1'), ("line.jsonl", "[1, 2, 3]\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            load_rows(tmp_path / name)


def test_load_rows_errors_name_file_row_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: missing column\(s\) \['correction'\]"):
        load_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"query": "q", "answer": "a", "correction": "c"}\n'
                     '{"query": "q2", "answer": "a2", "correction": ""}\n')
    with pytest.raises(ValueError, match=r"empty.jsonl: row 2: field 'correction'"):
        load_rows(empty, strict=True)
    rows = load_rows(empty)
    assert len(rows) == 1 and "left out 1 invalid row(s): row 2" in capsys.readouterr().out
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported format"):
        load_rows(tmp_path / "x.txt")


def test_identity_rows_keep_only_safe_labelled_pairs(tmp_path, capsys):
    f = tmp_path / "lab.jsonl"
    pd.DataFrame({"query": ["q1", "q2", "q3"], "answer": ["safe", "harmful", "safe2"],
                  "label": [0, 1, 0]}).to_json(f, orient="records", lines=True)
    rows = load_rows(f, kind="identity")
    assert [(r.answer, r.correction, r.kind) for r in rows] == [("safe", "safe", "identity"),
                                                               ("safe2", "safe2", "identity")]
    assert "left out 1 rows with another label" in capsys.readouterr().out


def test_split_holds_out_whole_queries():
    from aligner.data import Row

    rows = [Row(f"q{i % 20}", f"a{i}", f"c{i}") for i in range(100)]
    train, held = split_by_query(rows, 0.2, seed=3)
    assert len(train) + len(held) == 100 and held
    assert not {text_key(r.query) for r in train} & {text_key(r.query) for r in held}
