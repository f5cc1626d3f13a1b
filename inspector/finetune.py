"""Adapt the embedder to the pair task with LoRA on its top layers, cheaply on a CPU.

Why only the top layers, and why a cache: on 2 CPU cores a full forward+backward pass of MiniLM
over 9k pairs takes about half an hour per epoch. The lower layers are frozen, so their output for
a training pair never changes: it is computed once (one inference pass) and cached, and every
epoch then runs only the top ``train_layers`` layers forward and backward. The LoRA adapter is
merged into the weights at load time, so inference stays one plain small-encoder pass.

Supported embedders: BERT-family models (``model.encoder.layer``), which includes the packaged
MiniLM. For others, train with ``train_layers=0`` (frozen embeddings, head only).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
import numpy as np

from .encoder import PairEncoder, run_layers, transformer_layers


@dataclass
class FinetuneConfig:
    train_layers: int = 2
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    members: int = 1  # an ensemble of adapters, member k trained with seed + k (see PairEncoder)

    def to_dict(self) -> dict:
        return asdict(self)


class TopLayerFinetuner:
    """LoRA on the top ``train_layers`` layers of ``encoder``'s transformer, trained from a cache of
    the frozen layers below; the linear probe used during training is thrown away afterwards
    (the calibrated head is fitted on the adapted embeddings)."""

    def __init__(self, encoder: PairEncoder, config: FinetuneConfig | None = None):
        self.encoder = encoder
        self.config = config or FinetuneConfig()
        self.n_layers = len(transformer_layers(encoder.transformer))
        if not 1 <= self.config.train_layers <= self.n_layers:
            raise ValueError(f"train_layers must be in 1..{self.n_layers}, got {self.config.train_layers}")
        self.start = self.n_layers - self.config.train_layers
        self.peft_model = None

    def cache_lower(self, input_ids, type_ids, show_progress: bool = True) -> list:
        """Hidden states entering the first trainable layer, one (tokens, dim) bf16 tensor a window."""
        import torch
        from tqdm.auto import tqdm

        tf = self.encoder.transformer
        cache = [None] * len(input_ids)
        order = np.argsort([-len(x) for x in input_ids], kind="stable")
        bs = self.encoder.batch_size
        with torch.inference_mode():
            for i in tqdm(range(0, len(order), bs), desc="caching frozen layers", unit="batch",
                          disable=not show_progress):
                idx = order[i:i + bs]
                feats = self.encoder.collate([input_ids[j] for j in idx], [type_ids[j] for j in idx])
                hidden = tf(**feats, output_hidden_states=True).hidden_states[self.start]
                for row, j in enumerate(idx):
                    cache[j] = hidden[row, :len(input_ids[j])].to(torch.bfloat16).clone()
        return cache

    def _upper(self, hidden, mask, pool_mask=None):
        """Top layers + the sentence-transformers pooling/normalising modules; ``pool_mask`` (default
        the attention mask) picks the tokens pooled, e.g. a sentence run with its query part."""
        tf = self.encoder.transformer
        states = run_layers(tf, transformer_layers(tf)[self.start:], hidden, mask)
        return self.encoder.pool(states, mask if pool_mask is None else pool_mask)

    @staticmethod
    def _pool_mask(mask, spans, rows):
        """Pooling mask for examples ``rows``: a span (answer start, run start, run end) pools the
        window's query part ([CLS] query [SEP]), the run and the closing [SEP], as ``PairEncoder``
        does for sentence runs at scoring time; a span with answer start -1 is the whole window."""
        if spans is None:
            return None
        pool = mask.clone()
        for r, (a0, s, e) in enumerate(spans[rows]):
            if a0 >= 0:
                last = int(mask[r].sum()) - 1
                pool[r] = 0
                pool[r, :a0] = 1
                pool[r, s:e] = 1
                pool[r, last] = 1
        return pool

    @staticmethod
    def _pad(cache, idx):
        import torch

        lengths = [cache[j].shape[0] for j in idx]
        hidden = torch.zeros((len(idx), max(lengths), cache[idx[0]].shape[-1]))
        mask = torch.zeros((len(idx), max(lengths)), dtype=torch.long)
        for row, (j, n) in enumerate(zip(idx, lengths)):
            hidden[row, :n] = cache[j].float()
            mask[row, :n] = 1
        return hidden, mask

    def embed_cached(self, cache, windows: np.ndarray, show_progress: bool = False,
                     spans: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of the given windows (or of their ``spans``, see ``_pool_mask``) through the
        (current) top layers; equals a full pass."""
        import torch
        from tqdm.auto import tqdm

        windows = np.asarray(windows)
        out = np.zeros((len(windows), self.encoder.member_dim), dtype=np.float32)
        order = np.argsort([-cache[j].shape[0] for j in windows], kind="stable")
        bs = self.encoder.batch_size * 2
        with torch.inference_mode():
            for i in tqdm(range(0, len(order), bs), desc="embedding (top layers)", unit="batch",
                          disable=not show_progress):
                pos = order[i:i + bs]
                hidden, mask = self._pad(cache, windows[pos])
                out[pos] = self._upper(hidden, mask, self._pool_mask(mask, spans, pos)).float().numpy()
        return out

    def reset(self) -> None:
        """Remove any adapter, back to the frozen embedder (for another training run)."""
        if self.peft_model is not None:
            self.encoder.transformer = self.peft_model.unload()
            self.peft_model = None

    def fit(self, cache, windows: np.ndarray, labels, show_progress: bool = True,
            epochs: int | None = None, spans: np.ndarray | None = None) -> dict:
        """Train a fresh adapter on the cached ``windows`` (for ``epochs``, default the config's);
        with ``spans`` (one (answer start, run start, run end) row per example, answer start -1 for
        the whole window) some examples are sentence runs pooled from their window's pass, so the
        adapter learns to keep a run's verdict whatever surrounds it. Returns per-epoch mean loss."""
        import torch
        from peft import LoraConfig, get_peft_model
        from tqdm.auto import tqdm

        self.reset()
        cfg = self.config
        n_epochs = epochs or cfg.epochs
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        windows = np.asarray(windows)
        spans = None if spans is None else np.asarray(spans, dtype=np.int64)
        y = torch.tensor(np.asarray(labels, dtype=np.float32))
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=["query", "key", "value", "dense"],
                          layers_to_transform=list(range(self.start, self.n_layers)),
                          layers_pattern="layer")
        self.peft_model = get_peft_model(self.encoder.transformer, lora)
        self.encoder.transformer = self.peft_model
        probe = torch.nn.Linear(self.encoder.member_dim, 1)
        torch.nn.init.zeros_(probe.weight)
        scale = torch.nn.Parameter(torch.tensor(10.0))  # embeddings are unit-norm: logits need room
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": params, "weight_decay": cfg.weight_decay},
                                 {"params": list(probe.parameters()) + [scale], "weight_decay": 0.0}],
                                lr=cfg.lr)
        n = len(windows)
        total = math.ceil(n / cfg.batch_size) * n_epochs
        warm = max(1, int(cfg.warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
        pos = float(y.sum())
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((n - pos) / max(pos, 1.0)))
        lengths = np.array([cache[j].shape[0] for j in windows])
        history = []
        self.peft_model.train()
        for epoch in range(n_epochs):
            # shuffle, then sort inside blocks of 20 batches so padding stays small
            perm = rng.permutation(n)
            block = cfg.batch_size * 20
            batches = []
            for i in range(0, n, block):
                b = perm[i:i + block]
                b = b[np.argsort(-lengths[b], kind="stable")]
                batches += [b[j:j + cfg.batch_size] for j in range(0, len(b), cfg.batch_size)]
            rng.shuffle(batches)
            losses = []
            bar = tqdm(batches, desc=f"fine-tuning epoch {epoch + 1}/{n_epochs}", unit="batch",
                       disable=not show_progress)
            for idx in bar:
                hidden, mask = self._pad(cache, windows[idx])
                logits = scale * probe(self._upper(hidden, mask, self._pool_mask(mask, spans, idx))).squeeze(-1)
                loss = loss_fn(logits, y[idx])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            history.append(float(np.mean(losses)))
        self.peft_model.eval()
        return {"train_loss_by_epoch": history}

    def save_adapter(self, out_dir: str | Path) -> None:
        import json

        self.peft_model.save_pretrained(str(out_dir), safe_serialization=True)
        # peft keeps target_modules as a set: write it sorted so that the same build gives the same file
        cfg_path = Path(out_dir) / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
