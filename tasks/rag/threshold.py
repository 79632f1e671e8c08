"""The retrieval-score threshold: when the best passage is not relevant enough, the answer is
"no passage answers this" instead of the nearest sentence, however far it is.

Relevance of the top passage = (its cosine to the question + its best sentence's cosine) / 2, minus
NO_OVERLAP_PENALTY when that sentence shares no content word with the question (a weak semantic match
with no word in common is how off-topic questions look: "What is the capital of France?" against
SQuAD's Huguenot passages scores 0.44 on the cosines alone, and shares no word with the sentence it
finds). Calibrated for all-MiniLM-L6-v2 on SQuAD 2.0 (half the dev set) and on the built-in passages
against 60 off-topic questions (tasks/samples/rag_off_topic.jsonl); the figures are in docs/labs.md.
"""

from __future__ import annotations

import re

import numpy as np

NO_ANSWER = "no passage answers this"
DEFAULT_MIN_SCORE = 0.37
"""Default --min_score for the default embedder (all-MiniLM-L6-v2); other embedders have other scales."""
NO_OVERLAP_PENALTY = 0.10
STOP_WORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been being do does did what which who "
    "whom whose when where why how many much that this these those it its as into than there their they he she "
    "his her i you we my your our can could should would will shall may might must not no yes about".split())


def content_words(text: str) -> set[str]:
    """Lower-case words without stop words, crudely stemmed (the first 6 letters; a plural's s dropped)."""
    words = (w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS)
    return {w[:6] if len(w) > 6 else w.rstrip("s") if len(w) > 3 else w for w in words}


def relevance(store, qvec: np.ndarray, question: str, passage: int) -> float:
    """How well this passage answers the question (see the module's docstring); about -0.1 to 1."""
    passage_score = passage_cosine(store, qvec, passage)
    rows = store.sentence_rows(passage)
    if not rows:
        return passage_score - NO_OVERLAP_PENALTY
    sims = store.sentence_vecs[rows] @ qvec
    best = rows[int(np.argmax(sims))]
    score = (passage_score + float(sims.max())) / 2
    if not content_words(question) & content_words(store.sentences[best][1]):
        score -= NO_OVERLAP_PENALTY
    return score


def passage_cosine(store, qvec: np.ndarray, passage: int) -> float:
    """The passage vector's cosine to the question (its vector read back from the FAISS index)."""
    return float(store.index.reconstruct(int(passage)) @ qvec)
