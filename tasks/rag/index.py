"""Indexing: passages and their sentences embedded once, a FAISS index over the passage vectors,
all cached in an index folder and reused while the sources, embedder and index kind are unchanged."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from tasks.api import LabsError
from tasks.causal_lm import cache_dir
from tasks.rag.embedding import Embedder
from tasks.rag.passages import BUILTIN_DOCS, Passage, load_passages

INDEX_KINDS = ("flat", "ivf", "hnsw")


def make_index(vectors: np.ndarray, kind: str = "flat"):
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(np.sqrt(len(vectors))), len(vectors) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, nlist // 4)
        index.make_direct_map()  # reconstruct(i): a passage's vector back for its relevance
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
    """A built index: passages, their FAISS index, and sentence vectors (re-ranking, extractive answers)."""
    passages: list[Passage]
    index: object
    sentences: list[tuple[int, str]]  # (passage number, sentence)
    sentence_vecs: np.ndarray
    meta: dict

    def __post_init__(self):
        self._by_passage: dict[int, list[int]] = {}
        for i, (p, _) in enumerate(self.sentences):
            self._by_passage.setdefault(p, []).append(i)

    def sentence_rows(self, passage: int) -> list[int]:
        """Rows of `sentences` / `sentence_vecs` that belong to this passage."""
        return self._by_passage.get(passage, [])

    def search(self, qvecs: np.ndarray, k: int, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(scores, passage numbers) [questions, k]: FAISS over the passage vectors; with rerank, its top
        candidates re-ordered by passage + best sentence score (rerank below)."""
        if not rerank:
            return self.index.search(qvecs, min(k, len(self.passages)))
        return rerank_candidates(self, qvecs, k)


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
    return cache_dir() / "rag" / _fingerprint(sources, embedder, kind)


def build_store(sources: list[str], embedder: Embedder, kind: str, index_dir: Path,
                text_field: str = "text", rebuild: bool = False, log=print) -> Store:
    """Load the cached index in index_dir when it was built from the same sources, embedder and
    kind; otherwise embed, build and save it there (with progress bars on rank 0 in a terminal, and
    one line with the counts at the end)."""
    fp = _fingerprint(sources, embedder.name, kind)
    meta_file = index_dir / "meta.json"
    if not rebuild and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") == fp or (not sources and meta.get("sources")):
            return load_store(index_dir)
    t0 = time.perf_counter()
    passages = load_passages(sources, text_field)
    sentences = [(i, s) for i, p in enumerate(passages) for s in split_sentences(p.text)]
    log(f"embedding {len(passages):,} passages and {len(sentences):,} sentences with {embedder.label} "
        f"into a {kind} index ...")
    vecs = embedder.encode([p.text for p in passages], desc="embed passages")
    svecs = embedder.encode([s for _, s in sentences], desc="embed sentences")
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
    log(f"built {kind} index of {len(passages):,} passages ({len(sentences):,} sentences) in "
        f"{meta['build_s']} s -> {index_dir}")
    return Store(passages, index, sentences, svecs, meta)


def load_store(index_dir: Path) -> Store:
    need = ["meta.json", "index.faiss", "passages.jsonl", "sentences.jsonl", "sentences.npy"]
    missing = [n for n in need if not (index_dir / n).is_file()]
    if missing:
        raise LabsError(f"--index_dir {index_dir}: no built index there (missing {', '.join(missing)}); "
                        f"build it with --docs FILE --index_dir {index_dir} --build_only")
    passages = [Passage(**json.loads(ln)) for ln in open(index_dir / "passages.jsonl")]
    sentences = [tuple(json.loads(ln)) for ln in open(index_dir / "sentences.jsonl")]
    index = faiss.read_index(str(index_dir / "index.faiss"))
    if hasattr(index, "make_direct_map"):  # IVF (saved by an older version without its direct map)
        index.make_direct_map()
    return Store(passages, index, sentences,
                 np.load(index_dir / "sentences.npy"), json.loads((index_dir / "meta.json").read_text()))


def best_sentence(store: Store, qvec: np.ndarray, passage: int) -> float:
    """The cosine of the passage's sentence closest to the question (0 for a passage without one)."""
    rows = store.sentence_rows(passage)
    return float((store.sentence_vecs[rows] @ qvec).max()) if rows else 0.0


def rerank_candidates(store: Store, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
