"""Supervised fine-tuning of an aligner with the paper's identity warm-up, on transformers' Trainer.

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
from dataclasses import MISSING, dataclass, fields
from functools import partial
from pathlib import Path

import torch

from inspector.encoder import resolve_embedder

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


@dataclass
class TrainConfig:
    """A training run: every option of ``python -m aligner.train`` (``--batch-size`` is
    ``batch_size``) with the command line's defaults. ``parse_args`` builds one, ``train`` runs it."""

    out: str
    recipe: str | None = None
    data: list[str] | None = None
    identity: list[str] | None = None
    data_dir: str | None = None
    exclude_source: list[str] | None = None
    base: str = "minilm"
    decoder_layers: int | None = None
    template: str | None = None
    max_input_tokens: int = 512
    max_target_tokens: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None
    identity_warmup: float = 0.1
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    freeze_encoder: bool = False
    max_identity_ratio: float | None = None
    gradient_checkpointing: bool = False
    no_bf16: bool = False
    eval_share: float = 0.05
    eval_rows: int = 200
    eval_every: int = 200
    save_every: int = 200
    keep_checkpoints: int = 2
    max_minutes: float | None = None
    generation: str | dict = "{}"
    threads: int | None = None
    device: str = "auto"
    seed: int = 0
    resume: bool | str | None = None
    # not an option: where the --max-identity-ratio cap is counted (see gather_rows)
    identity_cap: str = "after_exclude"


# ----------------------------------------------------------------------------- model
def build_base_model(base: str, decoder_layers: int | None = None):
    """Load the base as a generator: causal LM, encoder-decoder, or (encoder only) bert2bert.
    ``minilm`` names the packaged all-MiniLM-L6-v2 folder (works offline)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                              EncoderDecoderModel)

    path = resolve_embedder(None if base == "minilm" else base)
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


def train(cfg: TrainConfig, callbacks: list | None = None) -> Path:
    """Run ``cfg``; ``callbacks``: more ``TrainerCallback``s for transformers' Trainer."""
    from transformers import ProgressCallback, set_seed

    from .trainer import (AlignerTrainer, Cadence, PlannedExamples, RunLog, TimeCap, last_checkpoint,
                          training_arguments)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    out = Path(cfg.out)
    template = validate_template(cfg.template or DEFAULT_TEMPLATE)
    generation = json.loads(cfg.generation) if isinstance(cfg.generation, str) else dict(cfg.generation or {})
    resume_from = None
    if cfg.resume:
        where = out / "checkpoints" if cfg.resume is True else Path(cfg.resume)
        resume_from = last_checkpoint(where) if cfg.resume is True else where
        if resume_from is None or not (resume_from / "trainer_state.json").exists():
            old = any(where.glob("step-*"))  # the format before Trainer
            raise SystemExit(f"--resume: no checkpoint found in {where}"
                             + (" (its step-N folders are from an older version: start afresh)" if old else ""))

    rows, files = gather_rows(cfg)
    train_rows, eval_rows = split_by_query(rows, cfg.eval_share, seed=cfg.seed)
    identity_rows = [Row(r.query, r.answer, r.answer, "identity", r.source) for r in train_rows]
    print(f"[aligner.train] {len(train_rows)} training rows "
          f"({sum(r.kind == 'correction' for r in train_rows)} corrections, "
          f"{sum(r.kind == 'identity' for r in train_rows)} identity), {len(eval_rows)} held out")
    per_step = cfg.batch_size * cfg.grad_accum
    total, warm = plan_steps(len(train_rows), per_step, cfg.epochs, cfg.max_steps, cfg.identity_warmup)
    plan = make_schedule(len(identity_rows), len(train_rows), total, warm, per_step, cfg.seed)

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index:
        raise SystemExit(f"--device {cfg.device}: Trainer trains on the first visible GPU; choose it with "
                         f"CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
    try:
        model, tokenizer, how = build_base_model(cfg.base, cfg.decoder_layers)
    except OSError as exc:
        raise SystemExit(f"--base {cfg.base}: cannot load it ({exc})") from None
    # template, limits and generation settings as the saved aligner will hold them: checked now
    # (one generated token), not after the training run
    Aligner(model, tokenizer, template=template, max_input_tokens=cfg.max_input_tokens,
            max_new_tokens=cfg.max_target_tokens, generation=generation)
    is_enc_dec = bool(model.config.is_encoder_decoder)
    if cfg.freeze_encoder and not is_enc_dec:
        raise SystemExit("--freeze-encoder needs an encoder-decoder base")
    if not cfg.resume:  # a fresh run must not mix with an earlier run's log or checkpoints
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
        save_run_args(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_split(out, train_rows, eval_rows, files)  # once the run can start: a refused run changes nothing
    print(f"[aligner.train] base {cfg.base}: {how}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, device {device}")

    if cfg.lora:  # on --resume Trainer loads the checkpoint's adapter weights into it
        from peft import LoraConfig, TaskType, get_peft_model

        task = TaskType.SEQ_2_SEQ_LM if is_enc_dec else TaskType.CAUSAL_LM
        model = get_peft_model(model, LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules="all-linear"))
    if cfg.freeze_encoder:
        model.get_encoder().requires_grad_(False)

    enc = partial(encode_example, tokenizer, template, is_encoder_decoder=is_enc_dec,
                  max_input_tokens=cfg.max_input_tokens, max_target_tokens=cfg.max_target_tokens,
                  forced_bos=getattr(model.generation_config, "forced_bos_token_id", None) if is_enc_dec else None)
    sample = random.Random(cfg.seed).sample(eval_rows, min(len(eval_rows), cfg.eval_rows))
    eval_sets = {kind: [enc(r.query, r.answer, r.correction) for r in sample if r.kind == kind]
                 for kind in ("correction", "identity") if any(r.kind == kind for r in sample)}

    cap, log = TimeCap(cfg.max_minutes), RunLog(out / "train_log.jsonl", warm, list(eval_sets))
    trainer = AlignerTrainer(
        model=model, args=training_arguments(cfg, total, device, bool(eval_sets)),
        train_dataset=PlannedExamples(plan, {"identity": identity_rows, "correction": train_rows}, enc),
        eval_dataset=eval_sets or None, callbacks=[cap, Cadence(), *(callbacks or [])], is_encoder_decoder=is_enc_dec,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id, is_encoder_decoder=is_enc_dec))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(log)
    if resume_from is not None:
        start = json.loads((resume_from / "trainer_state.json").read_text())["global_step"]
        print(f"[aligner.train] resumed from {resume_from} at step {start}/{total}")
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    done = trainer.state.global_step
    if cap.stopped:
        print(f"\n[aligner.train] --max-minutes {cfg.max_minutes} reached at step {done}/{total}; "
              f"saved a checkpoint (continue with --resume)")
    if eval_sets:
        trainer.evaluate()
    final_eval = log.last_eval if eval_sets else log.write({"step": done, "event": "eval"})

    model = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    model.eval()
    aligner = Aligner(model, tokenizer, template=template, max_input_tokens=cfg.max_input_tokens,
                      max_new_tokens=cfg.max_target_tokens, generation=generation)
    aligner.save(out, recipe={k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(cfg).items()
                              if k in RECIPE_KEYS},
                 training={"base_kind": how, "steps_done": done, "steps_planned": total,
                           "identity_warmup_steps": warm, "stopped_early": cap.stopped,
                           "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                           "minutes": round((time.monotonic() - cap.t0) / 60, 2), **final_eval,
                           "command": " ".join(sys.argv)})
    if not cap.stopped:  # checkpoints only serve to resume an interrupted run
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
    """The CLI; defaults come from :class:`TrainConfig`. ``suppress``: only the options given appear."""
    kw = {"argument_default": argparse.SUPPRESS} if suppress else {}
    p = argparse.ArgumentParser(prog="python -m aligner.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    add = p.add_argument
    add("--recipe", choices=sorted(RECIPES),
        help="named defaults, e.g. cpu-small (the `make aligner` recipe); explicit options win")
    add("--data", nargs="+", help="correction files (JSONL/CSV/Parquet: query, answer, correction)")
    add("--identity", nargs="+", help="files of good answers to keep (query, answer; label-0 rows if labelled)")
    add("--data-dir", help="shared data folder: corrections.jsonl + safe_answers.jsonl + labeled_pairs.jsonl")
    add("--exclude-source", action="append", help="leave out rows whose 'source' is this (repeatable)")
    add("--base", help="HF id or path; 'minilm' = the packaged MiniLM (bert2bert warm start)")
    add("--out", required=not suppress, help="output model folder")
    add("--decoder-layers", type=int, help="bert2bert only: decoder depth (default or 0: all)")
    add("--template", help="prompt template with {question} and {answer}")
    add("--max-input-tokens", type=int)
    add("--max-target-tokens", type=int)
    add("--batch-size", type=int)
    add("--grad-accum", type=int)
    add("--epochs", type=float)
    add("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    add("--identity-warmup", type=float, help="share of steps spent learning to copy first")
    add("--lr", type=float)
    add("--warmup-ratio", type=float)
    add("--weight-decay", type=float)
    add("--max-grad-norm", type=float)
    add("--lora", action="store_true", help="train LoRA adapters (peft), merged on save")
    add("--lora-r", type=int)
    add("--lora-alpha", type=int)
    add("--lora-dropout", type=float)
    add("--freeze-encoder", action="store_true",
        help="encoder-decoder only: keep the (pretrained) encoder fixed; faster on CPU")
    add("--max-identity-ratio", type=float,
        help="cap identity rows at this multiple of the correction rows (default: all)")
    add("--gradient-checkpointing", action="store_true")
    add("--no-bf16", action="store_true", help="train in fp32 on GPU too")
    add("--eval-share", type=float, help="share of queries held out (never trained on)")
    add("--eval-rows", type=int, help="held-out rows used for the evaluation loss")
    add("--eval-every", type=int, help="steps between held-out evaluations (0: only at the end)")
    add("--save-every", type=int, help="steps between checkpoints (0: none but the time cap's)")
    add("--keep-checkpoints", type=int, help="newest checkpoints kept (0: all)")
    add("--max-minutes", type=float, help="stop (with a checkpoint) after this long (0: no cap)")
    add("--generation", help="JSON generation defaults stored with the model")
    add("--threads", type=int,
        help="CPU threads for torch (1 is much faster on a busy shared CPU); default: torch's choice")
    add("--device")
    add("--seed", type=int)
    add("--resume", nargs="?", const=True,
        help="continue from the latest checkpoint in --out (or from the given checkpoint folder)")
    if not suppress:
        p.set_defaults(**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING})
    return p


def parse_args(argv=None) -> TrainConfig:
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
    return TrainConfig(**vars(args))


def save_run_args(args: TrainConfig) -> Path:
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
