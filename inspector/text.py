"""Text as the inspector reads it: character tricks that change word pieces but not meaning are undone
before tokenising (every score, training and serving alike; see ``evasion`` for the attacks)."""
from __future__ import annotations

import re
import unicodedata

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
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
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
