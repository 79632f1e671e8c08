"""Re-ranking: FAISS's top candidates re-ordered by the mean of the passage's cosine and its best
sentence's cosine. A passage that merely shares the topic scores lower than one holding a sentence
that says the answer."""

from __future__ import annotations

import numpy as np

from tasks.rag.index import Store


def best_sentence(store: Store, qvec: np.ndarray, passage: int) -> float:
    """The cosine of the passage's sentence closest to the question (0 for a passage without one)."""
    rows = store.sentence_rows(passage)
    return float((store.sentence_vecs[rows] @ qvec).max()) if rows else 0.0


def rerank(store: Store, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k passages per question: the top max(4k, 20) FAISS candidates re-ordered by (passage cosine +
    best sentence cosine) / 2."""
    scores, ids = store.index.search(qvecs, min(max(4 * k, 20), len(store.passages)))
    out_s, out_i = np.full((len(qvecs), k), -np.inf, np.float32), np.full((len(qvecs), k), -1, np.int64)
    for r, (qv, row, sc) in enumerate(zip(qvecs, ids, scores, strict=True)):
        cands = [((float(s) + best_sentence(store, qv, int(i))) / 2, int(i)) for s, i in zip(sc, row, strict=True) if i >= 0]
        cands.sort(reverse=True)
        for c, (s, i) in enumerate(cands[:k]):
            out_s[r, c], out_i[r, c] = s, i
    return out_s, out_i
