"""Text as the inspector reads it: character tricks that change word pieces but not meaning are undone
before tokenising (every score, training and serving alike), and when scoring, text repeated back to
back is read once, and also left out (``collapse_repeats``; see ``evasion`` for the attacks)."""
from __future__ import annotations

import re
import unicodedata

import numpy as np

# bumped whenever normalize_text changes what the encoder sees (keys cached embeddings)
TEXT_VERSION = 1

# zero-width and invisible formatting characters that split words without showing
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e"
                                    "\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066"
                                    "\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e\u206f\u3164\ufeff\uffa0"))
# Cyrillic and Greek letters that render like Latin ones (the common confusables; NFKC keeps them)
_LOOKALIKES = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
    "ԁ": "d", "һ": "h", "ӏ": "l", "ո": "n", "ս": "u", "ԛ": "q", "ԝ": "w",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S", "У": "Y",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "χ": "x",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_CYR_GREEK = re.compile(r"[\u0370-\u03ff\u0400-\u052f]")
_LATIN = re.compile(r"[A-Za-z]")


def normalize_text(text: str) -> str:
    """NFKC (full-width and stylised letters become plain ones), invisible characters removed, and
    Cyrillic / Greek look-alikes mapped to Latin in words that mix them with Latin letters, or
    anywhere in mostly-Latin text (real Russian or Greek text is left alone)."""
    return _undo_lookalikes(unicodedata.normalize("NFKC", text).translate(_INVISIBLE))


def _undo_lookalikes(text: str) -> str:
    if not _CYR_GREEK.search(text):
        return text
    words = re.findall(r"\w+", text)
    mixed = any(_CYR_GREEK.search(w) and _LATIN.search(w) for w in words)
    latin_text = mixed or len(_LATIN.findall(text)) > 4 * len(_CYR_GREEK.findall(text))

    def fix(word: re.Match) -> str:
        w = word.group(0)
        if _CYR_GREEK.search(w) and (_LATIN.search(w) or (latin_text and _all_lookalikes(w))):
            return w.translate(_LOOKALIKES)
        return w

    return re.sub(r"\w+", fix, text)


def _all_lookalikes(word: str) -> bool:
    return all(ord(c) in _LOOKALIKES or not _CYR_GREEK.match(c) for c in word)


_WORD = re.compile(r"\S+")
_NOT_LETTERS = re.compile(r"[\W\d_]+")  # digits and punctuation: "(1)", "(2)" and "." compare equal


def collapse_repeats(text: str, min_copies: int = 3, max_unit_words: int = 64, keep: int = 1) -> str:
    """Text repeated back to back (a run of 1 to ``max_unit_words`` words, case, digits and
    punctuation aside, so numbering the copies does not hide them; at least ``min_copies`` times in
    a row) kept once, or with ``keep=0`` dropped (the score reads both: ``PairEncoder.scoring_views``).
    Why: a sentence pasted 40 times says nothing the first copy does not, but it fills the encoder's
    window and dilutes whatever harm sits next to it; read once, it cannot; dropped, it cannot even
    sit beside the harm. Text without such repeats comes back unchanged (whitespace included).
    Applied when scoring only: training copies keep their repeated filler on purpose (``evasion.
    augment_pairs``), a dilution the adapter learns to see through, which also helps against filler
    that is not repeated (measured: the model card).

    Cost is linear in the words for each unit length (one vectorised comparison per length), so no
    input can make it slow."""
    if keep not in (0, 1):
        raise ValueError(f"keep must be 0 (drop repeated runs) or 1 (keep one copy), got {keep}")
    spans = [m.span() for m in _WORD.finditer(text)]
    n = len(spans)
    if n < min_copies:
        return text
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(_NOT_LETTERS.sub("", text[s:e].casefold()), len(vocab)) for s, e in spans),
                      dtype=np.int64, count=n)
    if len(vocab) == n:
        return text
    positions = np.arange(n + 1)
    unit = np.zeros(n, dtype=np.int64)  # the shortest unit repeated >= min_copies times from word i
    for p in range(min(max_unit_words, n // min_copies), 0, -1):
        same = np.zeros(n + 1, dtype=bool)
        same[:n - p] = ids[:n - p] == ids[p:]
        # matching[i]: how many words from i on equal the word p further on, in a row
        next_mismatch = np.minimum.accumulate(np.where(same, n + 1, positions)[::-1])[::-1]
        matching = next_mismatch[:n] - positions[:n]
        unit = np.where(matching >= (min_copies - 1) * p, p, unit)
    if not unit.any():
        return text
    pieces, keep_from, i = [], 0, 0
    while i < n:
        p = int(unit[i])
        if not p:
            i += 1
            continue
        copies = 1
        while i + (copies + 1) * p <= n and np.array_equal(ids[i + copies * p:i + (copies + 1) * p], ids[i:i + p]):
            copies += 1
        pieces.append(text[keep_from:spans[i + p - 1][1] if keep else spans[i][0]])
        i += p * copies
        keep_from = spans[i][0] if i < n else len(text)
        if i < n and keep:
            pieces.append(" ")
    pieces.append(text[keep_from:])
    return "".join(pieces)
