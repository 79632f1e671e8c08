"""Answering one question: retrieve, check the relevance threshold, extract the closest sentence, and
optionally generate from a prompt holding the retrieved passages."""

from __future__ import annotations

import numpy as np

from tasks.rag.embedding import Embedder
from tasks.rag.generation import build_prompt
from tasks.rag.index import Store
from tasks.rag.threshold import NO_ANSWER, relevance


def extract(store: Store, qvec: np.ndarray, passage_ids: list[int]) -> tuple[str, int]:
    """The sentence of the retrieved passages closest to the question, and its passage (-1: none)."""
    rows = [i for p in passage_ids for i in store.sentence_rows(p)]
    if not rows:
        return "", -1
    best = rows[int(np.argmax(store.sentence_vecs[rows] @ qvec))]
    return store.sentences[best][1], store.sentences[best][0]


def answer(store: Store, embedder: Embedder, question: str, k: int, generator=None, rerank: bool = True,
           min_score: float = 0.0) -> dict:
    """The extractive answer (and the generated one, with a generator) and the sources; when the top
    passage's relevance is below `min_score` (> 0; 0 turns the threshold off), both answers are NO_ANSWER and `answered` is False (the
    sources are still listed: the nearest passages, for the reader to judge)."""
    q = embedder.encode([question])
    scores, ids = store.search(q, k, rerank)
    hits = [int(i) for i in ids[0] if i >= 0]
    score = relevance(store, q[0], question, hits[0]) if hits else float("-inf")
    answered = min_score <= 0 or score >= min_score
    sentence, src = extract(store, q[0], hits) if answered else (NO_ANSWER, -1)
    result = {"question": question, "answered": answered, "relevance": round(score, 4), "min_score": min_score,
              "extractive_answer": sentence, "extractive_source": store.passages[src].id if src >= 0 else None,
              "sources": [{"id": store.passages[i].id, "title": store.passages[i].title, "score": float(s),
                           "text": store.passages[i].text} for i, s in zip(hits, scores[0], strict=False)]}
    if generator is not None:  # every rank decides alike (same index, same vectors): no rank waits alone
        result["generated_answer"] = (generator(build_prompt(question, [store.passages[i] for i in hits]))
                                      if answered else NO_ANSWER)
    return result
