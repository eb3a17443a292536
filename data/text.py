"""Query and title text as hashed n-grams: numpy only, so the search recipe and the serving
predictor compute the same rows."""

from __future__ import annotations

import re
import zlib

import numpy as np


def text_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def hashed_ngrams(texts: list[str], buckets: int) -> np.ndarray:
    """Each text's words and character trigrams (of ``<word>``), hashed to rows 1..buckets-1
    of an n-gram table: ``[len(texts), longest]`` int64, padded with row 0 (which
    ``nn.EmbeddingBag(padding_idx=0)`` leaves out of the mean)."""
    rows = []
    for text in texts:
        grams = []
        for word in text_tokens(text):
            marked = f"<{word}>"
            grams += [f"w:{word}"] + [marked[i:i + 3] for i in range(len(marked) - 2)]
        rows.append([1 + zlib.crc32(g.encode()) % (buckets - 1) for g in grams])
    padded = np.zeros((len(rows), max([len(r) for r in rows] + [1])), dtype=np.int64)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    return padded
