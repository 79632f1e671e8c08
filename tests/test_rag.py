"""The RAG lab (tasks/rag/): retrieval, evaluation, the command line, the relevance threshold that
answers "no passage answers this" to off-topic questions, and the progress of long parts."""

from __future__ import annotations

import io
import json

import pytest
from conftest import SHARED_DATA

from launcher.common.errors import LabsError

# ---------------------------------------------------------------- retrieval and evaluation


@pytest.fixture(scope="module")
def rag_store(tmp_path_factory):
    from tasks.rag.embedding import Embedder
    from tasks.rag.index import build_store
    emb = Embedder()
    return emb, build_store([], emb, "flat", tmp_path_factory.mktemp("rag") / "index", log=lambda *_: None)


def test_rag_retrieves_the_right_passage(rag_store):
    from tasks.rag import answer
    emb, store = rag_store
    for question, gold in (("What is deep learning?", "deep-learning"),
                           ("Which ZeRO stage shards the parameters?", "zero"),
                           ("What does LoRA freeze?", "lora"),
                           ("Which communication library runs collectives on CPUs?", "gloo")):
        r = answer(store, emb, question, k=3)
        assert r["sources"][0]["id"] == gold, (question, r["sources"][0])
        assert r["extractive_source"] == gold


def test_rag_eval_metrics_and_index_kinds(rag_store, tmp_path):
    from tasks.rag.evaluation import evaluate
    from tasks.rag.index import build_store
    from tasks.rag.passages import BUILTIN_QUESTIONS, load_questions
    emb, store = rag_store
    qs = load_questions(str(BUILTIN_QUESTIONS))
    m = evaluate(store, emb, qs, k=5)
    assert m["hit@1"] == 1.0 and m["hit@5"] == 1.0 and m["extractive_contains_gold"] >= 0.9
    hnsw = build_store([], emb, "hnsw", tmp_path / "hnsw", log=lambda *_: None)
    assert evaluate(hnsw, emb, qs, k=5)["hit@5"] == 1.0
    # a question whose gold passage is absent counts as a miss
    from tasks.rag.passages import Question
    m = evaluate(store, emb, [qs[0], Question("What is deep learning?", ["x"], "tokenizer")], k=1)
    assert m["hit@1"] == 0.5 and m["extractive_contains_gold"] == 0.5


def test_rag_cli_and_bad_input(tmp_path, capsys):
    from tasks.rag.cli import main
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"id": f"p{i}", "text": t}) for i, t in enumerate(
        ["Cats purr when they are content.", "Rust is a systems programming language.",
         "The Nile is a river in Africa."])))
    index = tmp_path / "index"
    assert main(["--docs", str(docs), "--index_dir", str(index), "--build_only"]) == 0
    assert (index / "index.faiss").is_file()
    assert main(["--index_dir", str(index), "--query", "Which river flows in Africa?", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "The Nile is a river in Africa." in out and "[1] p2" in out
    empty = tmp_path / "q.jsonl"
    empty.write_text("\n")
    with pytest.raises(LabsError, match="no questions"):
        main(["--index_dir", str(index), "--eval", str(empty)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(LabsError, match=r"bad.jsonl.*'text' field"):
        main(["--docs", str(bad), "--index_dir", str(tmp_path / "i2")])
    with pytest.raises(LabsError, match="no built index"):
        main(["--index_dir", str(tmp_path / "nothing"), "--query", "x"])


@pytest.mark.skipif(not (SHARED_DATA / "squad_v2").is_dir(), reason="../shared/data/squad_v2 not present")
def test_squad_questions_load():
    from tasks.rag.passages import load_squad
    passages, questions = load_squad(SHARED_DATA / "squad_v2" / "dev-v2.0.json")
    assert len(passages) == 646 and len(questions) == 2910




# ---------------------------------------------------------------- "no passage answers this"

FIXTURES = SHARED_DATA / "fixtures"


def _questions(store_name: str):
    from tasks.rag import BUILTIN_QUESTIONS, OFF_TOPIC_QUESTIONS, load_questions
    on = load_questions(str(BUILTIN_QUESTIONS if store_name == "builtin" else FIXTURES / "rag_qa.jsonl"))
    off = load_questions(str(OFF_TOPIC_QUESTIONS))
    assert len(off) == 60 and all(q.no_answer and not q.answers and q.doc_id is None for q in off)
    return on, off


def _store(store_name: str, rag_store, tmp_path):
    if store_name == "builtin":
        return rag_store
    if not (FIXTURES / "rag_docs.jsonl").is_file():
        pytest.skip(f"{FIXTURES} not present")
    from tasks.rag import build_store
    emb = rag_store[0]
    return emb, build_store([str(FIXTURES / "rag_docs.jsonl")], emb, "flat", tmp_path / "i", log=lambda *_, **__: None)


@pytest.mark.parametrize("part", [0, 1])
def test_threshold_calibrated_on_one_split_holds_on_the_other(part, rag_store, tmp_path):
    """tasks/rag/threshold.py `calibrate` on every other question of both stores (the built-in passages and
    the shared SQuAD fixture; answerable and off-topic alike), then the held-out other half: answerable
    questions answered, off-topic ones refused; both halves take their turn as the held-out one.
    The two groups nearly touch (the weakest built-in question scores 0.378, the strongest off-topic one over
    the fixture 0.282; over all of SQuAD they overlap, docs/labs.md), so half of these few questions does
    not pin the threshold down. Measured (all-MiniLM-L6-v2): calibrated on part 0, 0.379: held out, 1 of 6
    built-in answerable questions refused (0.378), every off-topic one refused, the fixture perfect (balanced
    accuracy 0.917 / 1.0); on part 1, 0.279: 1 of 30 off-topic questions over the fixture answered (0.983),
    the built-in perfect. Asserted: held-out balanced accuracy >= 0.9 on each store."""
    from tasks.rag import evaluate
    from tasks.rag.threshold import calibrate, split, top_relevance
    stores = [(name, *_store(name, rag_store, tmp_path)) for name in ("builtin", "squad_fixture")]
    on_scores, off_scores = [], []
    for name, emb, store in stores:
        on, off = _questions(name)
        on_scores += top_relevance(store, emb, split(on, part))
        off_scores += top_relevance(store, emb, split(off, part))
    t = calibrate(on_scores, off_scores)
    for name, emb, store in stores:
        on, off = _questions(name)
        m = evaluate(store, emb, split(on, 1 - part) + split(off, 1 - part), k=5, min_score=t)
        print(f"\ncalibrated on part {part}: {t:.3f}; held out, {name}: answerable refused "
              f"{m['answerable_refused']:.3f}, off-topic refused {m['no_answer_refused']:.3f}")
        assert (1 - m["answerable_refused"] + m["no_answer_refused"]) / 2 >= 0.9, (name, t, m)


@pytest.mark.parametrize("store_name", ["builtin", "squad_fixture"])
def test_default_threshold_on_the_held_out_off_topic_questions(store_name, rag_store, tmp_path):
    """DEFAULT_MIN_SCORE was chosen on the 1st, 3rd, ... off-topic question (docs/labs.md): the other 30,
    never used to choose it, are refused; the stores' answerable questions are answered, from the right
    passage for the built-in ones."""
    from tasks.rag import DEFAULT_MIN_SCORE, NO_ANSWER, answer, evaluate
    from tasks.rag.threshold import split
    emb, store = _store(store_name, rag_store, tmp_path)
    on, off = _questions(store_name)
    m = evaluate(store, emb, on + split(off, 1), k=5, min_score=DEFAULT_MIN_SCORE)
    assert m["answerable_refused"] == 0.0 and m["no_answer_refused"] == 1.0, m
    if store_name == "builtin":
        assert m["hit@1"] == 1.0 and m["extractive_contains_gold"] >= 0.9
        r = answer(store, emb, "What is the capital of France?", k=3, min_score=DEFAULT_MIN_SCORE)
        assert not r["answered"] and r["extractive_answer"] == NO_ANSWER and r["extractive_source"] is None, r
        assert len(r["sources"]) == 3  # the nearest passages are still listed


def test_calibrate_picks_the_middle_of_the_widest_separating_gap():
    from tasks.rag.threshold import calibrate
    assert calibrate([0.5, 0.6, 0.9], [0.1, 0.2, 0.3]) == pytest.approx(0.4)
    # overlapping groups: 0.275 and 0.55 both reach balanced accuracy 5/6; the wider gap (0.2 - 0.35) wins
    assert calibrate([0.35, 0.6, 0.7], [0.1, 0.2, 0.5]) == pytest.approx(0.275)
    assert calibrate([0.6, 0.7], [0.65]) in (pytest.approx(0.625), pytest.approx(0.675))


def test_min_score_option_default_and_off(tmp_path, capsys):
    from tasks.rag.cli import main
    from tasks.rag.threshold import DEFAULT_MIN_SCORE
    index = str(tmp_path / "index")
    assert main(["--dry_run", "--index_dir", index, "--query", "What is the capital of France?", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "no passage answers this (relevance" in out and f"< --min_score {DEFAULT_MIN_SCORE})" in out and "nearest passages:" in out
    assert main(["--index_dir", index, "--query", "What is the capital of France?", "--min_score", "0"]) == 0
    out = capsys.readouterr().out
    assert "extractive answer:" in out and "no passage answers this" not in out


def test_relevance_penalises_a_sentence_without_a_shared_word(rag_store, monkeypatch):
    from tasks.rag.threshold import NO_OVERLAP_PENALTY, content_words, relevance
    assert content_words("Which ZeRO stages shard the parameters?") == {"zero", "stage", "shard", "parame"}
    emb, store = rag_store
    zero = next(i for i, p in enumerate(store.passages) if p.id == "zero")
    q = "Which ZeRO stage shards the parameters?"
    qv = emb.encode([q])[0]
    shared = relevance(store, qv, q, zero)
    # the same vectors, with no word in common: the score drops by the penalty exactly
    monkeypatch.setattr("tasks.rag.threshold.content_words", lambda text: {text})
    assert relevance(store, qv, q, zero) == pytest.approx(shared - NO_OVERLAP_PENALTY)


def test_ivf_index_gives_the_same_relevance(rag_store, tmp_path):
    from tasks.rag.index import build_store, load_store
    from tasks.rag.threshold import relevance
    emb, flat = rag_store
    build_store([], emb, "ivf", tmp_path / "ivf", log=lambda *_, **__: None)
    ivf = load_store(tmp_path / "ivf")  # read back from disk: reconstruct() needs its direct map again
    q = "What is the pipeline bubble?"
    qv = emb.encode([q])[0]
    assert relevance(ivf, qv, q, 3) == pytest.approx(relevance(flat, qv, q, 3), abs=1e-5)


# ---------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_rank_0_in_a_terminal_only(monkeypatch):
    from tasks.rag.progress import bar
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setenv("RANK", "0")
    b = bar(3, "embed passages", "text")
    b.update(3)
    b.close()
    assert "embed passages" in terminal.getvalue()
    monkeypatch.setenv("RANK", "1")
    assert bar(3, "embed passages").disable
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: quiet, the end line says the counts
    assert bar(3, "embed passages").disable


def test_build_and_eval_end_with_a_line_of_counts(tmp_path, capsys):
    from tasks.rag import DEFAULT_MIN_SCORE
    from tasks.rag.cli import main
    assert main(["--dry_run", "--index_dir", str(tmp_path / "i")]) == 0
    out = capsys.readouterr().out
    assert "embedding 12 passages and 36 sentences with all-MiniLM-L6-v2 into a flat index" in out
    assert "built flat index of 12 passages (36 sentences) in " in out
    assert ("evaluated 72 questions (12 answerable, 60 without an answer) in " in out
            and f"below --min_score {DEFAULT_MIN_SCORE}: 0 answerable and 60 without an answer refused" in out)
