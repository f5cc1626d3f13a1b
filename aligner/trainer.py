"""transformers' Trainer as ``python -m aligner.train`` runs it: the planned data order, the
recipe's losses, the time cap, the log and progress bar, and where checkpoints are. Imported only
to train (transformers' Trainer takes seconds to import)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import sort_checkpoints

from .data import Row
from .train import IGNORE

if TYPE_CHECKING:
    from .train import TrainConfig


class PlannedExamples(torch.utils.data.Dataset):
    """The schedule laid out flat: item k is the k-th example the run trains on (identity warm-up
    first), encoded on first use. Trainer reads it in order (``train_sampling_strategy="sequential"``),
    so a resumed run skips exactly the batches it already trained on."""

    def __init__(self, plan: list[tuple[str, list[int]]], pools: dict[str, list[Row]], encode):
        self.order = [(phase, i) for phase, idx in plan for i in idx]
        self.pools, self.encode, self.cache = pools, encode, {}

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict:
        key = self.order[k]
        if key not in self.cache:
            r = self.pools[key[0]][key[1]]
            self.cache[key] = self.encode(r.query, r.answer, r.correction)
        return self.cache[key]


class AlignerTrainer(Trainer):
    """Trainer keeping the recipe's losses: each micro-batch's loss is the model's mean per
    correction token, averaged over --grad-accum (seq2seq heads such as bert2bert's ignore
    ``num_items_in_batch``, so Trainer must not count on it), and a held-out ``eval_*_loss`` is the
    mean per token over the whole set (Trainer's own is a mean of batch means)."""

    def __init__(self, *args, is_encoder_decoder: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.shifted = not is_encoder_decoder  # causal: position t predicts token t+1
        self.token_loss = [0.0, 0]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        out = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        n = int((inputs["labels"][:, 1:] if self.shifted else inputs["labels"]).ne(IGNORE).sum())
        self.token_loss[0] += float(out[0]) * n
        self.token_loss[1] += n
        return out

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self.token_loss = [0.0, 0]
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        output.metrics[f"{metric_key_prefix}_loss"] = self.token_loss[0] / max(self.token_loss[1], 1)
        return output


class TimeCap(TrainerCallback):
    """--max-minutes: the step that reaches the cap ends the run with a checkpoint (the final
    evaluation follows); the cap counts from the start of this run's training loop."""

    def __init__(self, minutes: float | None):
        self.minutes, self.stopped, self.t0 = minutes, False, time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes and (time.monotonic() - self.t0) / 60 >= self.minutes and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = self.stopped = True
            control.should_evaluate = False


class Cadence(TrainerCallback):
    """--eval-every / --save-every given again on --resume apply (Trainer would keep the
    checkpoint's), and the last step makes no checkpoint or evaluation: the saved model and the
    final evaluation follow it."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = control.should_evaluate = False


class RunLog(ProgressCallback):
    """Trainer's progress bar, with phase, loss and the latest held-out losses beside it (not a
    printed dict per step), and each step and evaluation appended to ``train_log.jsonl``."""

    def __init__(self, path: Path, warm: int, kinds: list[str]):
        super().__init__()
        self.path, self.warm, self.kinds = path, warm, kinds
        self.postfix, self.pending, self.last_eval = {}, {}, {}

    def write(self, rec: dict) -> dict:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("aligner.train")

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if "loss" in logs:
            phase = "identity" if step <= self.warm else "correction"
            self.write({"step": step, "phase": phase, "loss": round(logs["loss"], 4), "lr": logs.get("learning_rate")})
            self.postfix.update(phase=phase[:4], loss=f"{logs['loss']:.3f}")
        for kind in self.kinds:  # Trainer logs each held-out set on its own: one record for all
            if f"eval_{kind}_loss" in logs:
                self.pending[f"eval_loss_{kind}"] = self.postfix[kind] = round(logs[f"eval_{kind}_loss"], 4)
        if self.kinds and len(self.pending) == len(self.kinds):
            self.last_eval, self.pending = self.write({"step": step, "event": "eval", **self.pending}), {}
        if self.training_bar is not None:
            self.training_bar.set_postfix(self.postfix)


def training_arguments(cfg: TrainConfig, total: int, device: torch.device, evaluate: bool) -> TrainingArguments:
    """The run's options as TrainingArguments; checkpoints go to ``--out/checkpoints/checkpoint-N``."""
    targs = TrainingArguments(
        output_dir=str(Path(cfg.out) / "checkpoints"), max_steps=total, seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, train_sampling_strategy="sequential",
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=int(cfg.warmup_ratio * total),
        eval_strategy="steps" if evaluate and cfg.eval_every else "no", eval_steps=cfg.eval_every or None,
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 1,  # 0: the cap's only
        save_total_limit=cfg.keep_checkpoints or None,
        logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False, report_to="none",
        disable_tqdm=False, remove_unused_columns=False, dataloader_pin_memory=device.type == "cuda",
        activation_checkpointing=cfg.gradient_checkpointing, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and not cfg.no_bf16 and torch.cuda.is_bf16_supported())
    targs._n_gpu = min(targs.n_gpu, 1)  # one device, no DataParallel (as Trainer does for model parallelism)
    return targs


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (Trainer writes its trainer_state.json last)."""
    done = [c for c in sort_checkpoints(str(folder)) if (Path(c) / "trainer_state.json").exists()] \
        if folder.is_dir() else []
    return Path(done[-1]) if done else None
