"""Filters for generated data: length, language, exact and near duplicates, and corrections that
barely differ from the answer (MiniLM cosine >= 0.9, the threshold of Ngweta et al. 2024).

The language check (English) is a deterministic heuristic, no model and no extra dependency.
It counts English function words ("the", "of", "how", ...) and very common function words of
other Latin-script languages ("der", "que", "les", "una", "het", "yang", ...) and fails a text when
  * fewer than 90% of its letters are ASCII (texts with 12+ letters: Cyrillic, CJK, mojibake), or
  * with 8+ words: the foreign words outnumber the English ones and are >= 10% of all words, or
    English function words are under 3% (gibberish, bare URLs, word lists); or
  * with 5-7 words: no English function word but at least two foreign ones.
Shorter texts pass. English prose runs at 35-50% function words. Measured on the project's real
data: 0 of 2,483 safe answers rejected, 19 of 3,887 labelled answers (bare word lists and strings
of swear words); short English imperatives ("Name five Nobel Prize winners.") pass because they
hold no foreign function word; most non-English ToxicChat prompts are caught.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from inspector.encoder import DEFAULT_EMBEDDER, resolve_embedder

EN_FUNCTION_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers him his how i if in into is it its itself just me more most my no nor not
now of off on once only or other our ours out over own same she should so some such than that the
their theirs them then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours
""".split())

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letter runs, any script


FOREIGN_FUNCTION_WORDS = frozenset("""
der das und ist nicht ich sie mit auf für ein eine einen zu den dem auch sich wir ihr aber oder wie
el la los las del que en un una por para con es como cómo qué se lo su al más pero muy está son
le les des du et est une pour pas qui dans sur avec je tu il nous vous ce cette mais ou sont être
di che della gli questo sono anche perché è
os da não uma com você são isso
het een van niet ik dat zijn voor wat hoe
yang dan di ini itu tidak dengan untuk saya apa bisa
bir ve bu için
""".split())


def language_problem(text: str, min_ascii: float = 0.9) -> str | None:
    """``None`` when ``text`` looks English, else a short reason (see the module docstring)."""
    letters = [ch for ch in text if ch.isalpha()]
    if len(letters) >= 12:
        ascii_share = sum(ch.isascii() for ch in letters) / len(letters)
        if ascii_share < min_ascii:
            return f"only {ascii_share:.0%} of the letters are ASCII"
    words = _WORD.findall(text.lower())
    en = sum(w in EN_FUNCTION_WORDS for w in words)
    fo = sum(w in FOREIGN_FUNCTION_WORDS for w in words)
    if len(words) >= 8:
        if fo > en and fo >= 0.1 * len(words):
            return f"more non-English ({fo}) than English ({en}) function words among {len(words)} words"
        if en < 0.03 * len(words):
            return f"English function words are {en}/{len(words)} of the words"
    elif len(words) >= 5 and en == 0 and fo >= 2:
        return f"{fo} non-English and no English function words among {len(words)} words"
    return None


def length_problem(text: str, min_chars: int, max_chars: int) -> str | None:
    """``too_short`` / ``too_long`` (stripped characters) or ``None``."""
    n = len(text.strip())
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    return None


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Key for exact-duplicate checks: case, punctuation and spacing do not count."""
    return _NON_WORD.sub(" ", text.lower()).strip()


class Embedder:
    """Normalised sentence embeddings (MiniLM by default), loaded on first use; ``model`` wraps a
    sentence-transformers model already loaded instead."""

    def __init__(self, name_or_path: str | None = None, device: str | None = None, batch_size: int = 64,
                 model=None):
        self.name = name_or_path or DEFAULT_EMBEDDER
        self.device = device or "cpu"
        self.batch_size = batch_size
        self._model = model

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(resolve_embedder(self.name), device=self.device)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        v = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32)


def pair_cosine(embedder: Embedder, a: list[str], b: list[str]) -> np.ndarray:
    """Cosine of a[i] with b[i] (one encode call for both sides): the synth filter's "correction
    too similar" and ``aligner.evaluate``'s keep rate, relevance and reference figures."""
    if len(a) != len(b):
        raise ValueError(f"pair_cosine needs as many b as a, got {len(a)} and {len(b)}")
    if not a:
        return np.zeros(0, dtype=np.float32)
    v = embedder.encode(list(a) + list(b))
    return np.sum(v[: len(a)] * v[len(a):], axis=1)


@dataclass
class NearDupIndex:
    """Accepted items' normalised embeddings; ``check`` answers "is this within ``threshold`` of
    anything accepted so far, including earlier items of the same batch?"."""

    threshold: float = 0.9

    def __post_init__(self):
        self._vecs = np.zeros((0, 0), dtype=np.float32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or not len(vecs):
            return
        if self._vecs.shape[1] != vecs.shape[1] or self._n + len(vecs) > len(self._vecs):
            cap = max(1024, 2 * (self._n + len(vecs)))
            grown = np.zeros((cap, vecs.shape[1]), dtype=np.float32)
            if self._n:
                grown[: self._n] = self._vecs[: self._n]
            self._vecs = grown
        self._vecs[self._n: self._n + len(vecs)] = vecs
        self._n += len(vecs)

    def check(self, vecs: np.ndarray) -> list[float | None]:
        """For each row: the similarity that makes it a near duplicate, or None (then it is added)."""
        out: list[float | None] = []
        if not len(vecs):
            return out
        prior = vecs @ self._vecs[: self._n].T if self._n else np.zeros((len(vecs), 0))
        accepted: list[int] = []
        for i in range(len(vecs)):
            best = float(prior[i].max()) if prior.shape[1] else -1.0
            if accepted:
                best = max(best, float((vecs[accepted] @ vecs[i]).max()))
            if best >= self.threshold:
                out.append(best)
            else:
                out.append(None)
                accepted.append(i)
        self.add(vecs[accepted])
        return out
