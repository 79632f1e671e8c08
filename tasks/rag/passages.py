"""Loading: passages to index (JSONL, CSV, text, SQuAD JSON, a hub dataset) and questions to ask."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from tasks.api import LabsError

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
BUILTIN_DOCS = SAMPLES / "rag_passages.jsonl"
BUILTIN_QUESTIONS = SAMPLES / "rag_questions.jsonl"
OFF_TOPIC_QUESTIONS = SAMPLES / "rag_off_topic.jsonl"
"""Questions no passage of the built-in collection or of SQuAD answers (`no_answer: true`), written for
this project to calibrate and test the retrieval-score threshold."""


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
    no_answer: bool = False
    """True for a question that no passage answers: the right reply is "no passage answers this"."""


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def load_squad(path: Path, unanswerable: bool = False) -> tuple[list[Passage], list[Question]]:
    """One passage per paragraph; the answerable questions (with `unanswerable`, also SQuAD 2.0's
    questions without an answer, as `no_answer` questions)."""
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
                elif unanswerable:
                    questions.append(Question(qa["question"], [], None, no_answer=True))
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
            out += load_squad(path)[0]
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
    """Questions from JSONL ({question, answer | answers, doc_id} or {question, no_answer: true}) or
    SQuAD JSON (the answerable ones)."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise LabsError(f"--eval {path_str}: no such file (expected JSONL with question/answer/doc_id or SQuAD JSON)")
    if path.suffix == ".json":
        qs = load_squad(path)[1]
    else:
        qs = []
        with _open(path) as f:
            for n, ln in enumerate(f, 1):
                if not ln.strip():
                    continue
                r = json.loads(ln)
                if "question" not in r:
                    raise LabsError(f"{path}: line {n} has no 'question' field; expected JSONL with "
                                    f"question, answer (or answers) and doc_id, or question and no_answer: true")
                ans = r.get("answers", r.get("answer")) or []
                qs.append(Question(r["question"], [ans] if isinstance(ans, str) else list(ans),
                                   str(r["doc_id"]) if r.get("doc_id") is not None else None,
                                   bool(r.get("no_answer", False))))
    if not qs:
        raise LabsError(f"{path}: no questions (expected JSONL lines with a 'question' field, or SQuAD "
                        f"JSON with answerable questions)")
    return qs
