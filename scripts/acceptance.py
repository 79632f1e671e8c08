"""`make acceptance`: the documented lab jobs on the real data of ../shared/data, and their headline figures.

    .venv/bin/python scripts/acceptance.py [--data_dir ../shared/data] [--only ag_news,rag] [--list]

Each lab runs as a user runs it (`labs launch JOB --data_dir DIR`, `labs rag ...`), one after another, its run
folder under runs/acceptance/. The figures it reports (from the run's summary.json, or the RAG evaluation's
JSON) go to docs/acceptance.json with the commit, the date, the CPU and the wall time of each lab; a lab run
again replaces its own entry and keeps the others. A figure that moved outside its tolerance since the last
run is printed as such: the file holds what this code measures now, not what it measured once.

README.md and docs/labs.md quote the file between markers (`<!-- acceptance -->` ... `<!-- /acceptance -->`,
and `<!-- acceptance demo -->` for the demo's answers): this script rewrites those blocks (`render`), and
tests/test_acceptance.py fails when a block differs from what the file renders, so the documents cannot
keep a figure the file no longer holds.

Tolerances: what a rerun on another CPU may move a figure by (seeded runs repeat to the digit on one
machine; float reduction order differs across CPUs). Accuracy and hit rates: +-0.02 absolute (40 RAG
questions: +-0.05, two questions); perplexities: +-3% relative.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "acceptance.json"
DOCS = (ROOT / "README.md", ROOT / "docs" / "labs.md")
BLOCKS = ("acceptance", "acceptance demo", "acceptance strategies")  # <!-- NAME --> ... <!-- /NAME --> in each document
SQUAD = "squad_v2/dev-v2.0.json"
OFF_TOPIC = "tasks/samples/rag_off_topic.jsonl"


@dataclass
class Figure:
    key: str  # where in the lab's result: "perplexity", "eval_before.perplexity", "hit@5"
    label: str
    tol: float
    relative: bool = False
    digits: int = 3

    def tol_text(self) -> str:
        return f"{self.tol:.0%}" if self.relative else f"{self.tol:g}"

    def text(self, value: float) -> str:
        return f"{value:.{self.digits}f} ± {self.tol_text()}"

    def within(self, old: float, new: float) -> bool:
        return abs(new - old) <= (self.tol * abs(old) if self.relative else self.tol) + 1e-12


@dataclass
class Lab:
    name: str
    what: str
    argv: list[str]  # after `labs`; {data}: the data folder, {out}: this lab's output folder, {root}: --out
    figures: list[Figure]
    kind: str = "launch"  # launch: summary.json of the run; rag: the --out JSON
    texts: list[str] = field(default_factory=list)  # summary keys kept as text (greedy samples)


ACC, PPL = 0.02, 0.03
LABS = [
    Lab("ag_news", "AG News classifier (bert-small from scratch, 2 ranks, ZeRO-0, 2 epochs)",
        ["launch", "jobs/simple_model_zero0.yaml", "--data_dir", "{data}"],
        [Figure("accuracy", "accuracy, 2,000 test rows", ACC), Figure("eval_before.accuracy", "before training", ACC)]),
    Lab("imdb", "IMDB transfer learning (pretrained MiniLM, all layers, 2 ranks, ZeRO-0, 100 steps)",
        ["launch", "jobs/transfer_imdb.yaml", "--data_dir", "{data}"],
        [Figure("accuracy", "accuracy, 1,000 test reviews", ACC), Figure("eval_before.accuracy", "before training", ACC)]),
    Lab("smollm2_fine_tune", "SmolLM2-135M full fine-tuning on WikiText-2 (2 ranks, ZeRO-2, fp32, 12 steps)",
        ["launch", "jobs/fine_tune_smollm2.yaml", "--data_dir", "{data}", "--max_steps", "12"],
        [Figure("eval_before.perplexity", "perplexity before", PPL, True, 2),
         Figure("perplexity", "perplexity after", PPL, True, 2)]),
    Lab("smollm2_lora", "LoRA lab on SmolLM2-135M (r 8, 7 projections, 2 ranks, ZeRO-2, 8 steps)",
        ["launch", "jobs/tinyllama_lora_smollm2.yaml", "--data_dir", "{data}", "--max_steps", "8"],
        [Figure("eval_before.perplexity", "perplexity before", PPL, True, 2),
         Figure("perplexity", "perplexity after", PPL, True, 2)]),
    Lab("demo", "`make demo`: SmolLM2-135M fine-tuned on the built-in text (2 ranks, ZeRO-2, 12 steps)",
        ["launch", "jobs/demo_smollm2.yaml"],
        [Figure("eval_before.perplexity", "held-out perplexity before", PPL, True, 1),
         Figure("perplexity", "held-out perplexity after", PPL, True, 1)],
        texts=["samples_before", "samples_after"]),
    Lab("rag", "RAG retrieval + extractive answer, SQuAD 2.0 half dev set (646 passages, 2,910 answerable "
        "questions) + 60 off-topic questions, flat index, re-ranking",
        ["rag", "--docs", "{data}/" + SQUAD, "--index_dir", "{root}/rag_index", "--eval", "{data}/" + SQUAD, OFF_TOPIC,
         "--out", "{out}/rag.json"],
        [Figure("hit@5", "hit@5", ACC), Figure("hit@1", "hit@1", ACC),
         Figure("extractive_contains_gold", "extractive answer contains gold", ACC),
         Figure("no_answer_refused", "off-topic refused", ACC)], kind="rag"),
    Lab("rag_smollm2", "RAG with SmolLM2-135M answering through its chat template (first 40 answerable + 40 "
        "off-topic questions)",
        ["rag", "--docs", "{data}/" + SQUAD, "--index_dir", "{root}/rag_index", "--eval", "{data}/" + SQUAD, OFF_TOPIC,
         "--max_questions", "40", "--generator", "smollm2-135m", "--max_new_tokens", "32", "--out", "{out}/rag.json"],
        [Figure("generated_contains_gold", "generated answer contains gold", 0.05),
         Figure("extractive_contains_gold", "extractive, same questions", 0.05),
         Figure("no_answer_refused", "off-topic refused", 0.05)], kind="rag"),
]


# SmolLM2-135M's real weights under every strategy the model supports (issue 20: held-out perplexity falls below
# its step-0 value under each; the suite proves each equal to one rank on a 2-layer SmolLM2-shaped model). The
# same job, data and global batch of 8 sequences; 6 updates. The figure "memory" is the summary's peak-memory
# prediction over the measured peak (above the framework baseline) of the rank farthest from 1: fitted on none
# of these runs, it checks the memory model out of sample.
SMOL_JOB = ["launch", "jobs/fine_tune_smollm2.yaml", "--data_dir", "{data}", "--max_steps", "6"]
MEM = Figure("memory.ratio", "memory predicted / measured (worst rank)", 0.1, digits=2)


def _strategy(name: str, what: str, *args: str, tokens: int = 256) -> Lab:
    return Lab(f"smollm2_{name}", f"SmolLM2-135M fine-tuned under {what} (fp32, 8 sequences of {tokens} tokens a "
               "step, 6 steps)", [*SMOL_JOB, *args],
               [Figure("eval_before.perplexity", "perplexity before", PPL, True, 2),
                Figure("perplexity", "perplexity after", PPL, True, 2), MEM])


STRATEGIES = [
    _strategy("zero0", "ZeRO-0, 2 ranks", "--ds-config", "ds_configs/zero0.json"),
    _strategy("zero1", "ZeRO-1, 2 ranks", "--ds-config", "ds_configs/zero1.json"),
    _strategy("zero2", "ZeRO-2, 2 ranks", "--ds-config", "ds_configs/zero2.json"),
    _strategy("zero3", "ZeRO-3, 2 ranks", "--ds-config", "ds_configs/zero3.json"),
    _strategy("zero3_offload", "ZeRO-3 + CPU offload, 2 ranks", "--ds-config", "ds_configs/zero3_offload.json"),
    _strategy("pipeline2", "2 pipeline stages (30 layers, the tied embedding in both)", "--ds-config",
              "ds_configs/pipeline.json", "--set", "ds.gradient_accumulation_steps=4"),
    _strategy("tp3", "tensor parallel 3 (3 query heads and 1 key-value head per rank)", "--ds-config",
              "ds_configs/tensor_parallel.json", "--hostfile", "hostfiles/localhost3", "--set",
              "ds.tensor_parallel.autotp_size=3", "ds.gradient_accumulation_steps=4"),
    _strategy("sp3", "Ulysses sequence parallel 3 (blocks of 255 tokens: 3 divides them)", "--ds-config",
              "ds_configs/sequence_parallel.json", "--hostfile", "hostfiles/localhost3", "--set",
              "ds.sequence_parallel_size=3", "data.block_size=255", tokens=255),
]
ALL = LABS + STRATEGIES
GROUPS = {"labs": [x.name for x in LABS], "strategies": [x.name for x in STRATEGIES]}


class LabFailed(RuntimeError):
    """A lab that exited non-zero or left no figure: reported, the other labs still run."""


def lookup(result: dict, key: str):
    """A dotted key of the result; a list of per-rank ratios gives the one farthest from 1 (the worst rank)."""
    for part in key.split("."):
        result = (result or {}).get(part)
    if isinstance(result, list) and result and all(isinstance(v, (int, float)) for v in result):
        return max(result, key=lambda v: abs(v - 1.0))
    return result


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def code_changed() -> bool:
    """Tracked files other than what this script itself rewrites (the documents, *.md, and its results file,
    written after every lab) differ from the commit."""
    return bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md",
                    f":(exclude){RESULTS.relative_to(ROOT)}"))


def cpu_name() -> str:
    sys.path.insert(0, str(ROOT))
    from launcher.common.cache import cpu_model  # the name every run records
    return cpu_model()


def command(lab: Lab) -> str:
    """The lab's command as a user types it from the project root."""
    return "labs " + " ".join(a.replace("{data}", "../shared/data").replace("{out}", f"runs/acceptance/{lab.name}")
                              .replace("{root}", "runs/acceptance") for a in lab.argv)


def run_lab(lab: Lab, data: Path, out_root: Path) -> dict:
    out = out_root / lab.name
    argv = [a.format(data=data, out=out, root=out_root) for a in lab.argv]
    if lab.kind == "launch":
        argv += ["--set", f"train.output_dir={out}"]
    out.mkdir(parents=True, exist_ok=True)
    labs = Path(sys.executable).with_name("labs")
    shown = command(lab)
    print(f"\n[acceptance] {lab.name}: {shown}", flush=True)
    t0 = time.time()
    proc = subprocess.run([str(labs), *argv], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - t0
    if proc.returncode:
        raise LabFailed(f"[acceptance] {lab.name} failed (exit {proc.returncode}) after {wall:.0f} s: {shown}")
    if lab.kind == "rag":
        result, run_dir = json.loads((out / "rag.json").read_text()), out
    else:
        summary = max(out.glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
        result, run_dir = json.loads(summary.read_text()), summary.parent
    entry = {"what": lab.what, "command": shown, "commit": git("rev-parse", "--short", "HEAD"),
             "dirty": code_changed(),
             "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "wall_s": round(wall, 1), "run_dir": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT)
             else str(run_dir), "figures": {f.key: lookup(result, f.key) for f in lab.figures}}
    if lab.kind == "launch":
        entry["train_time_s"] = round(result.get("train_time_s") or 0.0, 1)
        entry["steps"] = result.get("steps")
    for key in lab.texts:
        entry[key] = result.get(key)
    missing = [k for k, v in entry["figures"].items() if not isinstance(v, (int, float))]
    if missing:
        raise LabFailed(f"[acceptance] {lab.name}: no figure {missing} in {run_dir}")
    return entry


def moved(lab: Lab, old: dict | None, new: dict) -> list[str]:
    """Figures outside their tolerance of the previous run's: printed, and replaced in the file."""
    if not old:
        return []
    return [f"{f.label}: {old['figures'][f.key]:.4f} -> {new['figures'][f.key]:.4f} (tolerance ± {f.tol_text()})"
            for f in lab.figures if f.key in old.get("figures", {})
            and not f.within(old["figures"][f.key], new["figures"][f.key])]


def render(results: dict, name: str = "acceptance") -> str:
    """A block README.md and docs/labs.md quote: every figure with its tolerance and where it came from
    ("acceptance"), or the demo's greedy answers before -> after ("acceptance demo")."""
    if name == "acceptance demo":
        return render_demo(results.get("labs", {}).get("demo"))
    group = STRATEGIES if name == "acceptance strategies" else LABS
    lines = [f"<!-- {name} -->", "", "Measured by `make acceptance` (`scripts/acceptance.py`, written to `docs/acceptance.json`; "
             "tolerance = what a rerun on another CPU may move a figure by):", "",
             "| lab | command | figures | measured |", "|---|---|---|---|"]
    for lab in group:
        e = results.get("labs", {}).get(lab.name)
        if not e:
            lines.append(f"| {lab.what} | `{command(lab)}` | not measured yet | |")
            continue
        figs = "; ".join(f"{f.label} {f.text(e['figures'][f.key])}" for f in lab.figures)
        when = f"{e['date'][:10]}, commit {e['commit']}{' (+ local changes)' if e['dirty'] else ''}, " \
               f"{e['wall_s'] / 60:.1f} min"
        lines.append(f"| {lab.what} | `{e['command']}` | {figs} | {when} |")
    cpus = sorted({results.get("labs", {}).get(x.name, {}).get("cpu", "") for x in group} - {""})
    lines += ["", f"Machine: {', '.join(cpus) or 'none yet'}; 2 cores, no GPU.", "", f"<!-- /{name} -->"]
    return "\n".join(lines)


def render_demo(e: dict | None) -> str:
    lines = ["<!-- acceptance demo -->", ""]
    if not e:
        return "\n".join([*lines, "(`make acceptance` has not measured the demo yet)", "", "<!-- /acceptance demo -->"])
    f = e["figures"]
    lines += [f"Measured by `make acceptance` ({e['date'][:10]}, commit {e['commit']}, {e.get('cpu', '?')}): the "
              f"held-out perplexity of the text {f['eval_before.perplexity']:.1f} -> {f['perplexity']:.1f} "
              f"(± 3%) in {e['steps']} updates ({e['train_time_s']:.0f} s of training), and the greedy answers "
              "before -> after training are", "", "| prompt | before | after |", "|---|---|---|"]
    before = {s["prompt"]: s["answer"] for s in e.get("samples_before") or []}
    for s in e.get("samples_after") or []:
        cells = [s["prompt"], before.get(s["prompt"], "?"), s["answer"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ").strip() for c in cells) + " |")
    return "\n".join([*lines, "", "<!-- /acceptance demo -->"])


def splice(text: str, name: str, block: str, path: Path) -> str:
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin not in text:
        return text  # a document quotes only the blocks it has markers for
    if end not in text:
        raise SystemExit(f"{path}: {begin} without its {end}; add the closing marker")
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=os.environ.get("LABS_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    p.add_argument("--only", help="comma-separated lab names or groups (labs, strategies; default: all): "
                   + ",".join(x.name for x in ALL))
    p.add_argument("--out", default=str(ROOT / "runs" / "acceptance"), help="run folders")
    p.add_argument("--list", action="store_true", help="print the labs and their commands, run nothing")
    p.add_argument("--render", action="store_true", help="rewrite the documents' blocks from the file, run nothing")
    a = p.parse_args(argv)
    names = [m for n in (a.only or "").split(",") if n for m in GROUPS.get(n, [n])] or [x.name for x in ALL]
    unknown = sorted(set(names) - {x.name for x in ALL})
    if unknown:
        p.error(f"--only {','.join(unknown)}: no such lab; the labs are {', '.join(x.name for x in ALL)} "
                f"(groups: {', '.join(GROUPS)})")
    if a.list:
        for lab in ALL:
            print(f"{lab.name:18} {command(lab)}")
        return 0
    data = Path(a.data_dir).resolve()
    if not a.render and not (data / SQUAD).is_file():
        p.error(f"--data_dir {data}: no {SQUAD} there; point it at the offline data folder (../shared/data)")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"labs": {}}
    failed: list[str] = []
    if not a.render:
        cpu = cpu_name()
        for lab in (x for x in ALL if x.name in names):
            try:
                entry = run_lab(lab, data, Path(a.out).resolve())
            except LabFailed as e:
                failed.append(str(e))
                print(e, flush=True)
                continue
            entry["cpu"] = cpu
            for line in moved(lab, results["labs"].get(lab.name), entry):
                print(f"[acceptance] {lab.name}: moved outside its tolerance, corrected: {line}")
            results["labs"][lab.name] = entry
            results["python"], results["platform"] = sys.version.split()[0], platform.platform()
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # after every lab: nothing measured is lost
            print(f"[acceptance] {lab.name}: " + "; ".join(f"{f.label} {f.text(entry['figures'][f.key])}"
                                                           for f in lab.figures), flush=True)
    for path in DOCS:
        text = path.read_text()
        for name in BLOCKS:
            text = splice(text, name, render(results, name), path)
        path.write_text(text)
    print(f"[acceptance] {RESULTS.relative_to(ROOT)} and the blocks of "
          f"{', '.join(str(d.relative_to(ROOT)) for d in DOCS)} written")
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
