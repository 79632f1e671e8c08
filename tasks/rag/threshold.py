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


def top_relevance(store, embedder, questions) -> list[float]:
    """Each question's relevance of its top passage (re-ranked, as `answer` and `evaluate` retrieve)."""
    qvecs = embedder.encode([q.question for q in questions], desc="embed questions")
    _, ids = store.search(qvecs, 5, True)
    return [relevance(store, qv, q.question, int(row[0])) if row[0] >= 0 else float("-inf")
            for q, qv, row in zip(questions, qvecs, ids, strict=True)]


def split(items: list, part: int) -> list:
    """Every other item from `part` (0: the 1st, 3rd, ...; 1: the 2nd, 4th, ...): the calibration split
    and the held-out one (DEFAULT_MIN_SCORE was chosen on part 0 of the off-topic questions)."""
    return items[part::2]


def calibrate(answerable: list[float], no_answer: list[float]) -> float:
    """The --min_score that best separates the two groups' relevances: the highest balanced accuracy
    (share of answerable questions answered + share of the others refused, over 2); among equally good
    thresholds, the middle of the widest gap between two scores (the largest margin on both sides)."""
    if not answerable or not no_answer:
        raise ValueError("calibration needs answerable questions and questions without an answer")
    values = sorted(set(answerable) | set(no_answer))
    cuts = [(lo + hi) / 2 for lo, hi in zip(values, values[1:], strict=False)] or values

    def accuracy(t: float) -> float:
        return (sum(s >= t for s in answerable) / len(answerable) + sum(s < t for s in no_answer) / len(no_answer)) / 2

    best = max(accuracy(t) for t in cuts)
    gaps = [(hi - lo, (lo + hi) / 2) for lo, hi in zip(values, values[1:], strict=False) if accuracy((lo + hi) / 2) == best]
    return max(gaps)[1] if gaps else cuts[0]
