"""Evaluation over a question file: retrieval hit@1 / hit@k (the gold passage among the top k), the
share of answers that contain a gold answer, and the relevance threshold's effect: answerable
questions it refuses, questions without an answer (off-topic) it refuses, and the relevance
distribution of each group (what --min_score is calibrated from)."""

from __future__ import annotations

import re
import time

import numpy as np

from tasks.api import LabsError
from tasks.rag.answer import extract
from tasks.rag.embedding import Embedder
from tasks.rag.generation import build_prompt
from tasks.rag.index import Store
from tasks.rag.passages import Question
from tasks.rag.progress import bar
from tasks.rag.threshold import relevance

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z ]+", " ", s.lower()).split())


def contains_answer(text: str, answers: list[str]) -> bool:
    t = f" {_norm(text)} "
    return any(_norm(a) and f" {_norm(a)} " in t for a in answers)


def distribution(values: list[float]) -> dict[str, float]:
    """n, min, the PERCENTILES and max of a list of scores (empty: n = 0 only)."""
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(values), "min": round(float(a.min()), 3),
            **{f"p{p}": round(float(np.percentile(a, p)), 3) for p in PERCENTILES}, "max": round(float(a.max()), 3)}


def evaluate(store: Store, embedder: Embedder, questions: list[Question], k: int, generator=None,
             rerank: bool = True, min_score: float = 0.0, log=None) -> dict:
    """Metrics over the questions; `log` (rank 0's print) gets one line with the counts at the end."""
    ids_known = {p.id for p in store.passages}
    gold_known = [q for q in questions if q.doc_id is not None]
    if gold_known and not any(q.doc_id in ids_known for q in gold_known):
        raise LabsError(f"none of the questions' doc_id values (e.g. {gold_known[0].doc_id!r}) name a passage "
                        f"of the index (e.g. {store.passages[0].id!r}); index the matching documents")
    t0 = time.perf_counter()
    qvecs = embedder.encode([q.question for q in questions], desc="embed questions")
    _, ids = store.search(qvecs, max(k, 5), rerank)
    _, dense = store.search(qvecs, max(k, 5), rerank=False) if rerank else (None, ids)
    hit1 = hitk = with_gold = ext_ok = gen_ok = with_answer = refused_answerable = refused_none = 0
    scores: dict[str, list[float]] = {"answerable": [], "no_answer": []}
    progress = bar(len(questions), "evaluate", "question")
    for q, qv, row in zip(questions, qvecs, ids, strict=True):
        row = [int(i) for i in row if i >= 0]
        names = [store.passages[i].id for i in row]
        score = relevance(store, qv, q.question, row[0]) if row else float("-inf")
        answered = min_score <= 0 or score >= min_score
        scores["no_answer" if q.no_answer else "answerable"].append(score)
        if q.no_answer:
            refused_none += not answered
        else:
            refused_answerable += not answered
        if q.doc_id is not None:
            with_gold += 1
            hit1 += names[:1] == [q.doc_id]
            hitk += q.doc_id in names[:k]
        if q.answers:
            with_answer += 1
            if answered:  # a refused answerable question counts as an answer without the gold one
                ext_ok += contains_answer(extract(store, qv, row[:k])[0], q.answers)
                if generator is not None:
                    gen_ok += contains_answer(generator(build_prompt(q.question, [store.passages[i] for i in row[:k]])),
                                              q.answers)
        progress.update(1)
    progress.close()
    n_answerable, n_none = len(scores["answerable"]), len(scores["no_answer"])
    out = {"questions": len(questions), "passages": len(store.passages), "index": store.meta.get("index"), "k": k,
           "hit@1": hit1 / max(with_gold, 1), f"hit@{k}": hitk / max(with_gold, 1),
           "extractive_contains_gold": ext_ok / max(with_answer, 1), "eval_s": round(time.perf_counter() - t0, 1)}

    def hits(table, n: int) -> float:
        return sum(q.doc_id in [store.passages[int(i)].id for i in row[:n] if i >= 0]
                   for q, row in zip(questions, table, strict=True) if q.doc_id) / max(with_gold, 1)
    out["hit@5"] = hits(ids, 5)
    out["rerank"] = rerank
    out["dense_hit@1"], out["dense_hit@5"] = hits(dense, 1), hits(dense, 5)
    if generator is not None:
        out["generated_contains_gold"] = gen_ok / max(with_answer, 1)
    out["min_score"] = min_score
    out["answerable_refused"] = refused_answerable / max(n_answerable, 1)
    if n_none:
        out["no_answer_refused"] = refused_none / n_none
    out["relevance"] = {group: distribution(values) for group, values in scores.items() if values}
    if log is not None:
        log(f"evaluated {len(questions):,} questions ({n_answerable:,} answerable, {n_none:,} without an answer) "
            f"in {out['eval_s']} s: hit@1 {out['hit@1']:.3f}, hit@{k} {out[f'hit@{k}']:.3f}; below --min_score "
            f"{min_score}: {refused_answerable:,} answerable and {refused_none:,} without an answer refused")
    return out
