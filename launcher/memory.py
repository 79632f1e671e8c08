"""Will it fit? Peak memory per rank: predicted before launch (`labs plan`), measured in every run.

Predicted (`predict`, plain arithmetic: `labs plan` imports no torch for it), per rank:
  model states for the run's real precision and optimizer (`model_state_bytes`: fp32 4 B params + 4 B grads
  + 8 B Adam moments, + ZeRO's 4 B fp32 master partition; bf16/fp16 DeepSpeed's mixed-precision accounting),
  partitioned by ZeRO stage over dp, pipeline stages holding only their layers, AutoTP splitting the matrices;
  + activations (micro batch x sequence x (13h + 4i) per block, only block inputs under activation
  checkpointing, the micro-batches a stage holds in flight under 1F1B) and the logits with the loss (fp32)
  + communication buffers (ZeRO-0's flat gradient all-reduce, ZeRO's reduce bucket, ZeRO-3's prefetch and
  live parameters) + the optimizer step's temporaries and ZeRO's flat copies (measured, see the constants)
  + on CPU the task's runtime and the parts of the HF model every rank builds whole before it is split
  + the framework's baseline: the RSS of a process that imported torch, deepspeed, transformers and datasets,
  measured once per machine and cached in $LABS_CACHE_DIR/memory_baseline.json.
Measured (`PeakMeter`, in every rank): CPU, the high-water resident memory (VmHWM) after the first
PEAK_STEPS optimizer steps minus the rank's own RSS after those imports; GPU, torch.cuda.max_memory_allocated.
The worker writes both, and their ratio, into metrics.jsonl (kind "memory") and summary.json ("memory").

`zero_model_state_bytes` is DeepSpeed's own mixed-precision estimator written out (stages 2 and 3 equal
`estimate_zero2/3_model_states_mem_needs`, tests assert it), kept for `Plan.memory()`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def zero_model_state_bytes(stage: int, params: int, largest_layer: int, world: int,
                           offload_optimizer: bool = False, offload_param: bool = False) -> int:
    n = max(world, 1)
    if stage == 0:
        return 20 * params
    if stage == 1:
        return 2 * params + 2 * params + int(16 * params / n)
    if stage == 2:
        return 2 * params if offload_optimizer else 2 * params + int(18 * params / n)
    if stage == 3:
        layer = 4 * largest_layer
        if offload_optimizer:
            return layer if offload_param else layer + int(2 * params / n)
        return layer + int(18 * params / n)
    raise ValueError(f"ZeRO stage {stage}")


def fmt_bytes(n: float) -> str:
    if abs(n) >= 1024 ** 5:  # no machine's memory: say so (a huge int would overflow a float below)
        return "more than 1 PiB"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)



# ---------------------------------------------------------------- predicted: the peak of a run, per rank

MiB = 2**20
BUILT_BYTES = 4
"""Every rank builds the whole HF model in fp32 (tasks build it from config or load it) before the engine
wraps it: pipeline ranks keep it whole (the HF model stays referenced), ZeRO and AutoTP replace its storage."""


@dataclass
class Shape:
    """A llama/mistral/gpt2 model's sizes, from a preset or a config.json (no torch)."""

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    params: int
    embed: int  # input embeddings (+ GPT-2's positions)
    head: int  # lm_head (0 when tied to the embeddings)
    block: int  # one transformer block
    final: int  # the final norm

    @classmethod
    def of(cls, cfg: dict[str, Any], vocab: int) -> Shape | None:
        from tasks.presets import block_params
        arch = cfg.get("arch") or cfg.get("model_type")
        if arch in ("llama", "mistral"):
            h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
            heads = cfg["num_attention_heads"]
            kv = cfg.get("num_key_value_heads") or heads
            block = block_params(cfg)
            tied = bool(cfg.get("tie_word_embeddings", False))
            return cls(arch, vocab, h, n, heads, kv, i, tied, vocab * h * (1 if tied else 2) + n * block + h,
                       vocab * h, 0 if tied else vocab * h, block, h)
        if arch == "gpt2":
            h, n = cfg["n_embd"], cfg["n_layer"]
            inner = cfg.get("n_inner") or 4 * h
            block = block_params(cfg)
            embed = vocab * h + cfg.get("n_positions", 1024) * h
            return cls(arch, vocab, h, n, cfg["n_head"], cfg["n_head"], inner, True, embed + n * block + 2 * h,
                       embed, 0, block, 2 * h)
        return None


@dataclass
class Setup:
    """What a run does with the model on each rank: precision, ZeRO, offload, layout, batch, sequence."""

    stage: int = 0
    precision: str = "fp32"
    offload_optimizer: bool = False
    offload_param: bool = False
    dp: int = 1
    tp: int = 1
    pp: int = 1
    sp: int = 1
    micro: int = 1
    seq: int = 128
    grad_accum: int = 1
    checkpointing: bool = False
    reduce_bucket: int = 500_000_000
    allgather_bucket: int = 500_000_000
    prefetch: int = 50_000_000
    max_live: int = 1_000_000_000
    device: str = "cpu"
    trainable: int | None = None  # LoRA: the adapters (the base is frozen)
    datasets: bool = True  # the data comes through datasets.load_dataset (all but the built-in text sample)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.sp

    @classmethod
    def of(cls, cfg: dict[str, Any], layout, seq: int, trainable: int | None = None,
           device: str | None = None) -> Setup:
        from launcher import dsconfig
        from launcher.checkpoints import precision
        zero = cfg.get("zero_optimization") or {}
        off_opt, off_param = dsconfig.offload(cfg)

        def num(key: str, default: int) -> int:
            v = zero.get(key, default)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
        pipe_ckpt = (cfg.get("pipeline") or {}).get("activation_checkpoint_interval", 0) if layout.pp > 1 else 0
        return cls(stage=dsconfig.zero_stage(cfg), precision=precision(cfg), offload_optimizer=off_opt,
                   offload_param=off_param, dp=layout.dp, tp=layout.tp, pp=layout.pp, sp=getattr(layout, "sp", 1),
                   micro=int(cfg["train_micro_batch_size_per_gpu"]), seq=seq,
                   grad_accum=int(cfg["gradient_accumulation_steps"]),
                   checkpointing=dsconfig.wants_activation_checkpointing(cfg) or bool(pipe_ckpt),
                   reduce_bucket=num("reduce_bucket_size", 500_000_000),
                   allgather_bucket=num("allgather_bucket_size", 500_000_000),
                   prefetch=num("stage3_prefetch_bucket_size", 50_000_000),
                   max_live=num("stage3_max_live_parameters", 1_000_000_000),
                   device=device or ("cpu" if os.environ.get("DS_ACCELERATOR", "cpu") == "cpu" else "cuda"),
                   trainable=trainable)


@dataclass
class RankMemory:
    """The predicted peak of one rank (or of every rank alike), split into its parts (bytes)."""

    ranks: list[int]
    what: str  # "every rank", "stage 0", ...
    params: int  # the parameters this rank holds
    parts: dict[str, int]
    baseline: int

    @property
    def above_baseline(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        return self.above_baseline + self.baseline


def _blocks_per_stage(layers: int, pp: int) -> list[int]:
    """DeepSpeed's uniform split of the blocks ("type:Block"): the earlier stages take one more."""
    return [layers // pp + (1 if k < layers % pp else 0) for k in range(pp)]


def stage_params(shape: Shape, setup: Setup) -> list[int]:
    """Parameters each pipeline stage holds (one entry without a pipeline); AutoTP splits every block's
    matrices and the lm_head's rows by tp (the embeddings and norms stay whole)."""
    tp = setup.tp
    norms = 2 * shape.hidden if shape.arch != "gpt2" else 0  # per block; whole under AutoTP
    block = (shape.block - norms) // tp + norms
    out = []
    for k, n in enumerate(_blocks_per_stage(shape.layers, setup.pp)):
        p = n * block
        if k == 0:
            p += shape.embed
        if k == setup.pp - 1:
            p += shape.final + (shape.head or (shape.embed if setup.pp > 1 else 0)) // tp
        out.append(p)
    return out


def model_state_bytes(params: int, setup: Setup, largest: int = 0) -> dict[str, int]:
    """Parameters, gradients, fp32 master copy and Adam moments of `params` parameters on one rank, for the
    run's real precision and ZeRO stage, split as the engine holds them (StateMeter measures the same
    four). fp32: 4 B params + 4 B grads + 8 B moments, and ZeRO's optimizers (stage >= 1) keep a 4 B fp32
    master partition even of fp32 parameters; ZeRO-3 holds its gradient partition twice during the step.
    bf16/fp16: DeepSpeed's mixed-precision accounting (2 + 2 + 4 fp32 grads + 4 master + 8 moments)."""
    n = setup.dp * setup.sp  # sequence-parallel ranks hold replicas too: ZeRO partitions over dp x sp
    P = params
    frozen = 0
    if setup.trainable is not None:  # LoRA: the frozen base holds parameters only
        P = min(setup.trainable // (setup.tp * setup.pp), params)
        frozen = params - P
    e = 4 if setup.precision == "fp32" else 2
    if setup.precision == "fp32":
        table = {0: (4 * P, 0, 4 * P, 8 * P),
                 1: (4 * P, 4 * P // n, 4 * P, 8 * P // n),
                 2: (4 * P, 4 * P // n, 4 * P // n, 8 * P // n),
                 3: (4 * P // n, 4 * P // n, 8 * P // n, 8 * P // n)}
    else:
        table = {0: (2 * P, 4 * P, 6 * P, 8 * P),
                 1: (2 * P, 4 * P // n, 2 * P + 4 * P // n, 8 * P // n),
                 2: (2 * P, 4 * P // n, 6 * P // n, 8 * P // n),
                 3: (2 * P // n + 4 * largest, 4 * P // n, 4 * P // n, 8 * P // n)}
    p, m, g, o = table[min(setup.stage, 3)]
    p += e * frozen // (n if setup.stage == 3 else 1)
    return {"params": p, "master": m, "grads": g, "optimizer": o}


def activation_bytes(shape: Shape, setup: Setup, blocks: int, last: bool) -> tuple[int, int]:
    """(activations one micro-batch leaves for the backward pass in `blocks` blocks, the logits and loss
    buffers at the start of the backward pass on the stage holding the head). Per token and block, HF's
    Llama keeps about 13h + 4i elements (norm inputs and outputs, q/k/v and their rotated copies, the
    attention output, gate/up/SiLU/product of the MLP; SDPA's flash path keeps no s x s matrix); with
    activation checkpointing only each block's input (h) and one block recomputed. Logits: the fp32 logits,
    their log-softmax and the two gradients, 16 B per token and vocabulary entry. AutoTP splits the q/k/v/MLP activations by tp; sequence parallelism the tokens."""
    e = 4 if setup.precision == "fp32" else 2
    tokens = setup.micro * setup.seq // setup.sp
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)
    per_block = tokens * e * (6 * h + (7 * h + 2 * kv - 2 * h + 4 * i) // setup.tp)  # 13h + 4i for MHA, tp 1
    acts = blocks * tokens * e * h + per_block if setup.checkpointing else blocks * per_block
    acts += tokens * e * 2 * h  # embedding output, final norm
    logits = tokens * shape.vocab * 16 // setup.tp if last else 0
    return acts, logits


# Calibration on this machine (llama-small, fp32, 2 ranks, block_size 64 and 512: docs/strategies.md): the
# parts no formula above covers, in the units that explain them.
RUNTIME_CPU = 58 * MiB
"""What a CPU rank adds above the framework's imports before its model: tokenizer, the tokenized data,
gloo, Python objects (measured: the rank's RSS after building the task minus the model's fp32 parameters,
55-60 MiB for llama-tiny on the built-in text sample)."""
DATASETS_CPU = 67 * MiB
"""Data read through `datasets.load_dataset` (every source but the built-in text sample): its tables and
builder, measured 120-130 MiB in all for llama-small on WikiText-2, i.e. this much above RUNTIME_CPU."""
ZERO_COPIES = {1: 1.0, 2: 1.0}
"""ZeRO-1/2 flatten the parameters into their bit16 groups and copy the fp32 gradient partition around the
step: one more fp32 copy of the rank's parameters, measured (llama-small and llama-58m on CPU)."""
MMAP_MAX = 32 * MiB
"""glibc's largest mmap threshold: a freed tensor above it goes back to the OS, one below it stays in the heap."""
ZERO3_HEAP_COPIES = 3.7
"""ZeRO-3 (without zero.Init) gathers every full parameter in the forward and backward passes and holds its full
gradient until the reduce-scatter: the tensors of 16-32 MiB (fp32) among them stay in glibc's heap when freed,
this many copies of them (measured: llama-small's 31 MiB embedding and head; llama-58m's 62 MiB ones are
mmapped and returned, and nothing is left)."""
OPT_STEP_COPIES = 2
"""torch's foreach AdamW allocates temporaries of the parameters it updates (sqrt of the second moment,
the update): about two fp32 copies during the step. Measured: with gradient accumulation they add to the
communication buffers; with one micro-batch per step they reuse the buffers' freed memory (llama-small, ZeRO-0:
peak 544-577 MiB with one micro-batch of 2 x 64 tokens, 694-700 MiB with two)."""


def _rank_parts(shape: Shape, setup: Setup, k: int) -> tuple[int, dict[str, int]]:
    stage_p = stage_params(shape, setup)
    blocks = _blocks_per_stage(shape.layers, setup.pp)
    P = stage_p[k]
    last = k == setup.pp - 1
    states = model_state_bytes(P, setup, shape.embed // setup.tp)
    parts = {f"model states ({'+'.join(n for n, b in states.items() if b)})": sum(states.values())}
    in_flight = min(setup.pp - k, setup.grad_accum) if setup.pp > 1 else 1
    acts, logits = activation_bytes(shape, setup, blocks[k], last)
    parts["activations" + (f" ({in_flight} micro-batches in flight)" if in_flight > 1 else "")] = acts * in_flight
    parts["logits + loss"] = logits
    trained = setup.trainable if setup.trainable is not None else P
    opt_p = trained if setup.stage == 0 else trained // (setup.dp * setup.sp)
    buffers = 0
    if setup.stage == 0 and (setup.dp > 1 or setup.pp > 1):
        buffers += 4 * trained  # the gradients flattened into one all-reduce buffer (the pipeline engine's even at dp 1)
    elif setup.stage >= 1:  # ZeRO's reduce bucket (touched up to the gradients it holds), any dp
        buffers += 4 * min(setup.reduce_bucket, trained)
    if setup.stage == 3:
        buffers += 4 * min(setup.prefetch, shape.params) + 4 * min(setup.max_live, shape.params)
    parts["communication buffers"] = buffers
    temps = OPT_STEP_COPIES * 4 * opt_p
    if setup.grad_accum == 1:  # measured: with one micro-batch per step the step reuses the freed buffers
        temps = max(temps - buffers, 0)
    parts["optimizer step temporaries"] = temps
    if setup.stage in (1, 2):
        parts["ZeRO flat copies"] = int(ZERO_COPIES[setup.stage] * 4 * trained)
    if setup.stage == 3 and setup.device == "cpu":
        band = sum(n for n in (shape.embed, shape.head) if MMAP_MAX // 2 < 4 * n <= MMAP_MAX)
        parts["ZeRO-3 gathers kept in the heap"] = int(ZERO3_HEAP_COPIES * 4 * band)
    if setup.device == "cpu":
        parts["runtime (data, tokenizer, gloo)"] = RUNTIME_CPU + (DATASETS_CPU if setup.datasets else 0)
        full = shape.params
        if setup.pp > 1:  # the rest of the HF model stays referenced on every stage
            parts["the HF model's other stages"] = BUILT_BYTES * (full - P)
        elif setup.tp > 1 or setup.stage == 3:  # the whole model built before AutoTP / ZeRO-3 replaced it
            parts["the HF model as built"] = BUILT_BYTES * full
    return P, parts


def predict(shape: Shape, setup: Setup, baseline: int = 0) -> list[RankMemory]:
    """The peak memory of each distinct rank (all alike, or one per pipeline stage)."""
    out = []
    per_stage = setup.world // setup.pp
    for k in range(setup.pp):
        P, parts = _rank_parts(shape, setup, k)
        ranks = list(range(k * per_stage, (k + 1) * per_stage))
        out.append(RankMemory(ranks, "every rank" if setup.pp == 1 else f"stage {k}", P, parts,
                              baseline if setup.device == "cpu" else 0))
    return out


def per_rank(pred: list[RankMemory]) -> list[RankMemory]:
    return [rm for rm in pred for _ in rm.ranks]



# ---------------------------------------------------------------- the framework's baseline, cached per machine

def baseline_file() -> Path:
    return Path(os.environ.get("LABS_CACHE_DIR") or Path.home() / ".cache" / "llm-labs") / "memory_baseline.json"


def _baseline_key() -> str:
    return f"{os.uname().nodename} | {os.environ.get('DS_ACCELERATOR', 'cpu')}"


def cached_baseline() -> dict[str, Any] | None:
    try:
        return json.loads(baseline_file().read_text()).get(_baseline_key())
    except (OSError, ValueError):
        return None


def store_baseline(rss: int, source: str) -> None:
    path = baseline_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[_baseline_key()] = {"bytes": int(rss), "source": source, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def framework_baseline(measure: bool = True) -> tuple[int | None, str]:
    """Resident memory of a process that imported torch, deepspeed, transformers and datasets: measured once
    per machine in a child process (a few seconds) and cached in $LABS_CACHE_DIR/memory_baseline.json; every
    run's rank 0 refreshes it with its own figure."""
    c = cached_baseline()
    if c:
        return c["bytes"], f"{c['source']}, {c['when'][:10]}, cached"
    if not measure:
        return None, "not measured yet"
    import subprocess
    import sys
    code = "from launcher.memory import import_framework, rss_now; import_framework(); print(rss_now())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parent.parent,
                             env=os.environ | {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
        rss = int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None, "could not be measured"
    store_baseline(rss, "measured by labs plan")
    return rss, "measured now, cached"


# ---------------------------------------------------------------- a job's prediction, its alternatives, their speed

def shape_of_job(job) -> Shape | None:
    from launcher.plan import _preset_or_config
    from tasks.presets import PRESETS, VOCAB
    cfg = _preset_or_config(job)
    if cfg is None:
        return None
    vocab = VOCAB[cfg["tokenizer"]] if job.model.name in PRESETS else cfg.get("vocab_size")
    return Shape.of(cfg, vocab) if vocab else None


def trainable_of_job(job) -> int | None:
    if job.task != "tinyllama":
        return None
    from launcher.plan import LORA_DEFAULT, _preset_or_config
    from tasks.presets import lora_params
    cfg = _preset_or_config(job)
    opts = job.options
    return lora_params(cfg, opts.get("lora_r", 8), opts.get("lora_target_modules", LORA_DEFAULT)) if cfg else None


def predict_run(job, cfg: dict, layout, baseline: int | None = None) -> Prediction | None:
    shape = shape_of_job(job)
    if shape is None:
        return None
    setup = Setup.of(cfg, layout, job.data.block_size, trainable_of_job(job))
    setup.datasets = not (job.data.dataset == "sample" and not job.data.train_files)
    return Prediction(shape, setup, predict(shape, setup, baseline or 0), "this config")


@dataclass
class Prediction:
    shape: Shape
    setup: Setup
    ranks: list[RankMemory]
    name: str

    @property
    def per_rank(self) -> list[RankMemory]:
        return per_rank(self.ranks)

    @property
    def peak(self) -> int:
        return max(r.total for r in self.ranks)

    def label(self) -> str:
        s = self.setup
        return (f"{self.name}: dp {s.dp} x tp {s.tp} x pp {s.pp}, ZeRO-{s.stage}"
                + (" + offload" if s.offload_optimizer else "")
                + f", micro batch {s.micro} x {s.grad_accum}" + (", activation checkpointing" if s.checkpointing else ""))


def _with(setup: Setup, **kw) -> Setup:
    from dataclasses import replace
    return replace(setup, **kw)


def alternatives(shape: Shape, setup: Setup) -> list[tuple[str, Setup]]:
    """The other strategies on the same ranks with the same global batch (samples per step): ZeRO 0-3 and
    ZeRO-3 + offload (data parallel), pipeline (world stages, 1F1B), model parallel (one micro-batch),
    tensor parallel (AutoTP over world ranks, ZeRO-1), as the ds_configs/ files set them up."""
    w = setup.world
    global_batch = setup.micro * setup.grad_accum * setup.dp
    out = []
    for stage in range(4):
        out.append((f"zero{stage}", _with(setup, stage=stage, dp=w, tp=1, pp=1, sp=1, offload_optimizer=False,
                                          offload_param=False, grad_accum=max(global_batch // (setup.micro * w), 1))))
    out.append(("zero3_offload", _with(out[3][1], offload_optimizer=True, offload_param=True)))
    if w > 1 and shape.layers >= w:
        out.append(("pipeline", _with(setup, stage=min(setup.stage, 1), dp=1, tp=1, pp=w, sp=1, offload_optimizer=False,
                                      offload_param=False, grad_accum=max(global_batch // setup.micro, 1))))
        out.append(("model_parallel", _with(setup, stage=0, dp=1, tp=1, pp=w, sp=1, offload_optimizer=False,
                                            offload_param=False, micro=global_batch, grad_accum=1)))
    if w > 1 and shape.heads % w == 0 and shape.kv_heads % w == 0:
        out.append(("tensor_parallel", _with(setup, stage=1, dp=1, tp=w, pp=1, sp=1, offload_optimizer=False,
                                             offload_param=False, grad_accum=max(global_batch // setup.micro, 1))))
    return out


def step_seconds(shape: Shape, setup: Setup, flops_per_s: float, bandwidth: float) -> float:
    """A rough time per optimizer step, only to rank the configurations that fit: the model FLOPs of the
    global batch (6N + 12 L h s per token, +1/3 recomputed under activation checkpointing) over the ranks'
    peak, the pipeline bubble (S-1)/(M+S-1), and the bytes each rank moves over `bandwidth`: ZeRO-0/1/2
    all-reduce 2x the fp32 gradients, ZeRO-3 3x, offload the states over host memory twice, AutoTP 4
    all-reduces of the activations per block per micro-batch, a pipeline its boundary activations."""
    s = setup
    tokens = s.micro * s.seq * s.grad_accum * s.dp
    per_token = 6 * shape.params + 12 * shape.layers * shape.hidden * s.seq
    compute = tokens * per_token * (4 / 3 if s.checkpointing else 1) / (flops_per_s * s.world)
    if s.pp > 1:
        compute /= 1 - (s.pp - 1) / (s.grad_accum + s.pp - 1)
    e = 4 if s.precision == "fp32" else 2
    P = shape.params // (s.tp * s.pp)
    comm = 0.0
    if s.dp > 1:
        comm += (3 if s.stage == 3 else 2) * 4 * P * (s.dp - 1) / s.dp
    if s.offload_optimizer:
        comm += 2 * 16 * P / s.dp
    if s.tp > 1:
        comm += 4 * shape.layers * s.grad_accum * s.micro * s.seq * shape.hidden * e * 2 * (s.tp - 1) / s.tp
    if s.pp > 1:
        comm += 2 * s.grad_accum * s.micro * s.seq * shape.hidden * e
    return compute + comm / bandwidth


def machine_speed(precision: str = "fp32", threads: int = 1) -> tuple[float, float]:
    """(FLOP/s of one rank, bytes/s between ranks) for the ranking: the cached matmul peak (labs peak) when
    there is one, else 100 GFLOP/s; gloo's measured ~1.2 GB/s on CPU, 100 GB/s for GPUs."""
    flops = 100e9
    try:
        from launcher.mfu import read_cache
        best = [v["flops"] for k, v in read_cache().items() if f"| {precision} |" in k]
        if best:
            flops = min(best)
    except Exception:
        pass
    gpu = os.environ.get("DS_ACCELERATOR", "cpu") != "cpu"
    return flops, (100e9 if gpu else 1.2e9)


def fits(budget: int, shape: Shape, setup: Setup, baseline: int) -> list[tuple[str, Setup, int, float]]:
    """Every alternative (strategies x micro-batch sizes that keep the global batch x activation checkpointing
    off/on) whose predicted peak per rank is within `budget`, fastest first: (name, setup, peak, seconds)."""
    flops, bw = machine_speed(setup.precision)
    out = []
    for name, alt in [("this config", setup), *[(n, a) for n, a in alternatives(shape, setup) if a != setup]]:
        global_batch = alt.micro * alt.grad_accum * alt.dp
        micros = sorted({m for m in (alt.micro, *(2**k for k in range(12))) if m <= global_batch
                         and global_batch % (m * alt.dp) == 0 and (name != "model_parallel" or m == alt.micro)},
                        reverse=True)
        for m in micros:
            for ckpt in (False, True):
                cand = _with(alt, micro=m, grad_accum=global_batch // (m * alt.dp), checkpointing=ckpt)
                peak = max(r.total for r in predict(shape, cand, baseline))
                if peak <= budget:
                    out.append((name, cand, peak, step_seconds(shape, cand, flops, bw)))
    out.sort(key=lambda x: x[3])
    return out


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '8GB', '8g', '1.5T', or bytes."""
    import re
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 8GiB, 512MiB, 16GB)")
    n, unit, ib = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if (ib.startswith("i") or (unit and not ib)) else 1000
    return int(n * base ** " kmgt".index(unit or " ")) if unit else int(n)


def free_memory_per_rank(ranks_here: int) -> tuple[int, str]:
    """This machine's available memory (MemAvailable; a GPU's total memory with DS_ACCELERATOR set to one)
    divided among the ranks the hostfile starts here."""
    if os.environ.get("DS_ACCELERATOR", "cpu") not in ("cpu", ""):
        import shutil
        import subprocess
        if shutil.which("nvidia-smi"):  # the GPU's memory (each rank has one); no torch import in the plan
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=20).stdout.split()
                return int(out[0]) * MiB, f"GPU memory {fmt_bytes(int(out[0]) * MiB)} (nvidia-smi)"
            except (subprocess.SubprocessError, ValueError, IndexError, OSError):
                pass
    avail = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return avail // max(ranks_here, 1), f"this machine's available memory {fmt_bytes(avail)} / {ranks_here} rank(s)"


# ---------------------------------------------------------------- measured: the peak of a run, per rank

PEAK_STEPS = 3
"""The measured peak is read after this many optimizer steps (the first allocates Adam's moments while the
gradients are alive; later steps repeat the same pattern)."""


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM (peak resident) / RssShmem of this process, bytes; {} where /proc is missing."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssShmem", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss_now() -> int:
    s = _proc_status()
    if "VmRSS" in s:
        return s["VmRSS"]
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_peak() -> int:
    s = _proc_status()
    if "VmHWM" in s:
        return s["VmHWM"]
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BASELINE_IMPORTS = ("torch", "deepspeed", "transformers", "datasets")
"""What every rank imports before it builds anything; the framework baseline is the resident memory after them."""


def import_framework() -> None:
    import importlib
    for name in BASELINE_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:  # the model classes (transformers loads them lazily; a rank always does)
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
    except ImportError:
        pass


class PeakMeter:
    """This rank's memory, measured. CPU: resident memory (VmRSS) right after the framework's imports is
    the rank's baseline; the peak is the high-water mark (VmHWM, the kernel's own maximum of VmRSS, so no
    sampling thread can miss a spike) read after the first PEAK_STEPS optimizer steps, minus that
    baseline. GPU: `torch.cuda.max_memory_allocated` (the baseline is the CUDA allocator's 0).
    `mark(name)` records RSS and its peak at the phases of the start-up (for the breakdown)."""

    def __init__(self, device: str = "cpu"):
        import_framework()
        self.device = device
        self.baseline = rss_now() if device == "cpu" else 0
        self.phases: dict[str, dict[str, int]] = {}
        self.peak: int | None = None
        self.at_step = 0
        self.steps = PEAK_STEPS
        self.record: dict | None = None
        self.mark("baseline")

    def _now(self) -> dict[str, int]:
        if self.device == "cpu":
            s = _proc_status()
            return {"rss": s.get("VmRSS", rss_now()), "hwm": s.get("VmHWM", rss_peak()), "shmem": s.get("RssShmem", 0)}
        import torch
        return {"rss": torch.cuda.memory_allocated(), "hwm": torch.cuda.max_memory_allocated(), "shmem": 0}

    def mark(self, name: str) -> None:
        self.phases[name] = self._now()

    def step(self, step: int) -> None:
        """After each optimizer step: the peak is taken at step PEAK_STEPS (or the last, if fewer)."""
        if self.peak is None and step >= PEAK_STEPS:
            self.finish(step)

    def finish(self, step: int) -> None:
        if self.peak is None:
            now = self._now()
            self.phases[f"step{step}"] = now
            self.peak, self.at_step = max(now["hwm"] - self.baseline, 0), step

    def report(self) -> dict:
        return {"memory_baseline_bytes": self.baseline, "memory_peak_bytes": self.peak,
                "memory_peak_at_step": self.at_step, "memory_device": self.device,
                "memory_phases": {k: {kk: v - (self.baseline if kk != "shmem" else 0) for kk, v in p.items()}
                                  for k, p in self.phases.items()}}


def write_memory_record(mem: PeakMeter, job, cfg: dict, layout, metrics, step: int) -> dict:
    """Every rank's measured peak beside the prediction for it and their ratio; rank 0 writes it to
    metrics.jsonl (kind "memory") and keeps it for the summary. Collective (all_gather_object)."""
    import torch.distributed as dist
    try:
        pred = predict_run(job, cfg, layout)
    except Exception as e:  # a model the predictor does not know: measured only, and why
        pred, why = None, f"{type(e).__name__}: {e}"
    else:
        why = None
    measured: list = [None] * layout.world
    mine = (mem.peak, mem.baseline)
    if dist.is_initialized():
        dist.all_gather_object(measured, mine)
    else:
        measured = [mine]
    per_rank = pred.per_rank if pred else [None] * len(measured)
    rec = {"kind": "memory", "step": step, "device": mem.device,
           "measured_bytes": [m[0] for m in measured], "baseline_bytes": [m[1] for m in measured],
           "predicted_bytes": [p.above_baseline if p else None for p in per_rank],
           "ratio": [round(p.above_baseline / m[0], 3) if p and m[0] else None for p, m in zip(per_rank, measured, strict=True)],
           "predicted_total_bytes": [p.above_baseline + m[1] if p else None for p, m in zip(per_rank, measured, strict=True)],
           "predicted_parts": [p.parts if p else None for p in per_rank]}
    if why:
        rec["prediction_error"] = why
    mem.record = rec
    metrics.write(rec)
    if dist.is_initialized() and dist.get_rank() == 0 and mem.device == "cpu":
        store_baseline(mem.baseline, "measured by rank 0 of a run")  # what labs plan adds to its prediction
    return rec


# ---------------------------------------------------------------- what `labs plan` prints

NAMES = {"zero0": "ZeRO-0", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + offload",
         "pipeline": "pipeline", "model_parallel": "model parallel", "tensor_parallel": "tensor parallel",
         "this config": "this config"}


def _short_parts(rm: RankMemory) -> str:
    groups: dict[str, int] = {"framework": rm.baseline}
    for k, v in rm.parts.items():
        key = ("model states" if k.startswith("model states") else "activations" if k.startswith(("activations", "logits"))
               else "buffers" if k.startswith("communication") else "temporaries" if k.startswith(("optimizer", "ZeRO"))
               else "model as built" if k.startswith("the HF model") else "runtime")
        groups[key] = groups.get(key, 0) + v
    return " + ".join(f"{k} {fmt_bytes(v)}" for k, v in groups.items() if v)


def plan_lines(plan, budget_text: str | None = None, verbose: bool = False) -> list[str]:
    """The plan's memory lines: the predicted peak per rank of this config (its parts), the same for the other
    strategies on the same ranks and global batch, and whether it fits the memory per rank (--memory, or
    this machine's available memory over its ranks), with the configurations that do, fastest first."""
    try:
        pred = predict_run(plan.job, plan.ds_config, plan.layout)
    except (KeyError, TypeError, ValueError):
        pred = None
    if pred is None:
        return []
    baseline, source = framework_baseline()
    base = baseline or 0
    pred = Prediction(pred.shape, pred.setup, predict(pred.shape, pred.setup, base), "this config")
    s = pred.setup
    worst = max(pred.ranks, key=lambda r: r.total)
    lines = [f"  memory per rank, predicted peak: {fmt_bytes(worst.total)}"
             + (f" ({worst.what}, the largest)" if len(pred.ranks) > 1 else "") + f" = {_short_parts(worst)}"
             + f" [{s.precision}, micro batch {s.micro} x {s.seq // s.sp} tokens"
             + (", activation checkpointing" if s.checkpointing else "") + "]"]
    if verbose:
        lines.append(f"    framework baseline {fmt_bytes(base)} ({source}; torch, deepspeed, transformers, datasets "
                     f"imported); per part:")
        for rm in pred.ranks:
            lines.append(f"    {rm.what} ({rm.params:,} params): "
                         + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in rm.parts.items() if v))
    others = []
    for name, alt in alternatives(pred.shape, s):
        peak = max(r.total for r in predict(pred.shape, alt, base))
        others.append(f"{NAMES[name]}: {fmt_bytes(peak)}" + (" <- this config" if alt == s else ""))
    lines.append(f"  other strategies on {s.world} rank(s), same global batch: " + ", ".join(others))
    ranks_here = max(plan.hostfile.hosts.values()) if plan.hostfile.hosts else s.world
    if budget_text:
        try:
            budget, where = parse_size(budget_text), f"--memory {budget_text}"
        except ValueError as e:
            from launcher.errors import LabsError
            raise LabsError(f"--memory: {e}") from None
    else:
        budget, where = free_memory_per_rank(ranks_here)
    if worst.total <= budget:
        lines.append(f"  fits: {fmt_bytes(worst.total)} of {fmt_bytes(budget)} per rank ({where})")
        return lines
    lines.append(f"  DOES NOT FIT: {fmt_bytes(worst.total)} predicted, {fmt_bytes(budget)} per rank ({where})")
    ok = fits(budget, pred.shape, s, base)
    if not ok:
        lines.append("    no strategy, micro-batch size or activation checkpointing brings it under that: "
                     "more ranks, a smaller model or a shorter sequence")
        return lines
    lines.append("    these fit, fastest first (predicted time per step on this machine, a rough guide):")
    seen = set()
    for name, cand, peak, sec in ok:
        key = (name, cand.micro, cand.checkpointing)
        if key in seen:
            continue
        seen.add(key)
        flag = {"this config": "", "zero0": "--ds-config ds_configs/zero0.json"}.get(name, f"--ds-config ds_configs/{name}.json")
        sets = [f"ds.train_micro_batch_size_per_gpu={cand.micro}", f"ds.gradient_accumulation_steps={cand.grad_accum}"]
        if cand.checkpointing:
            sets.append("ds.activation_checkpointing.partition_activations=true")
        lines.append(f"    {len(seen)}. {NAMES[name]}, micro batch {cand.micro} x {cand.grad_accum}"
                     + (", activation checkpointing" if cand.checkpointing else "")
                     + f": {fmt_bytes(peak)}, ~{sec:.2f} s/step  ({' '.join([flag, '--set', *sets]).strip()})")
        if len(seen) >= (10 if verbose else 5):
            break
    return lines


def summary_row(rec: dict | None) -> list[tuple[str, str]]:
    """The run summary's line: each rank's measured peak beside the prediction and their ratio."""
    if not rec or not rec.get("measured_bytes"):
        return []
    meas, pred = rec["measured_bytes"], rec.get("predicted_bytes") or []
    text = ("measured " + " / ".join(fmt_bytes(b) if b is not None else "-" for b in meas)
            + f" above the baseline ({fmt_bytes(max(rec.get('baseline_bytes') or [0]))}), after step {rec['step']}")
    if any(pred):
        text += ("; predicted " + " / ".join(fmt_bytes(p) if p else "-" for p in pred) + " (ratio "
                 + " / ".join(f"{r:.2f}" if r else "-" for r in rec.get("ratio") or []) + ")")
    return [("peak memory / rank", text)]
