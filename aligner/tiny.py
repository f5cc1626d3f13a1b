"""Tiny, randomly initialised aligner checkpoints built in seconds from configs (no download):
for tests, benchmarks of the plumbing, and the pipeline's own tests. They use the packaged
MiniLM tokenizer, so their text is real wordpieces, but they are not trained to correct."""
from __future__ import annotations

from pathlib import Path

import torch


def _tokenizer():
    from inspector.encoder import resolve_embedder
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_embedder(None))


def build_tiny_checkpoint(out_dir: str | Path, kind: str = "causal", seed: int = 0,
                          hidden: int = 32, layers: int = 2, max_positions: int = 512) -> Path:
    """Write a tiny ``causal`` (GPT-2) or ``seq2seq`` (bert2bert) checkpoint to ``out_dir``."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    out = Path(out_dir)
    if kind == "causal":
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
                         n_head=2, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(cfg)
    elif kind == "seq2seq":
        common = dict(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=max_positions,
                      pad_token_id=tok.pad_token_id)
        enc = BertConfig(**common)
        dec = BertConfig(**common, is_decoder=True, add_cross_attention=True)
        model = EncoderDecoderModel(config=EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
        model.config.decoder_start_token_id = tok.cls_token_id
        model.config.eos_token_id = tok.sep_token_id
        model.config.pad_token_id = tok.pad_token_id
    else:
        raise ValueError(f"kind must be 'causal' or 'seq2seq', got {kind!r}")
    from .model import prepare_special_tokens

    prepare_special_tokens(model, tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_tiny_aligner(out_dir: str | Path, kind: str = "causal", **kwargs) -> Path:
    """A tiny checkpoint saved as a complete aligner folder (with ``aligner_config.json``)."""
    from .model import Aligner

    path = build_tiny_checkpoint(out_dir, kind, **{k: v for k, v in kwargs.items()
                                                   if k in ("seed", "hidden", "layers", "max_positions")})
    al = Aligner.load(path, device="cpu", **{k: v for k, v in kwargs.items()
                                             if k in ("template", "max_input_tokens", "max_new_tokens")})
    al.save(path)
    return path
