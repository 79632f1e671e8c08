"""Will it fit? Peak memory per rank: predicted before launch (`labs plan`), measured in every run.

Predicted (`predict`, plain arithmetic: `labs plan` imports no torch for it), per rank:
  model states for the run's real precision and optimizer (`model_state_bytes`: fp32 4 B params + 4 B grads
  + 8 B Adam moments, + ZeRO's 4 B fp32 master partition; bf16/fp16 DeepSpeed's mixed-precision accounting),
  partitioned by ZeRO stage over dp, pipeline stages holding only their layers, AutoTP splitting the matrices;
  + activations (micro batch x sequence x (8h + 2kv + 4i) per block: what autograd saves in HF's Llama, a test
  counts it on the real model; only block inputs under activation checkpointing; the micro-batches a stage
  holds in flight under 1F1B) and the logits with the loss (fp32, 16 B per token and vocabulary entry) and the
  head's weight gradient
  + communication buffers (ZeRO-0's flat gradient all-reduce, ZeRO's reduce bucket, ZeRO-3's prefetch and
  live parameters) + AdamW's step temporaries (from torch's source: fused none, foreach one copy, for-loop two
  of the largest tensor)
  + on CPU glibc's heap (freed tensors up to 32 MiB stay resident: the parameters as built where the engine
  replaces them, ZeRO-3's gathered ones), the parts of the HF model a pipeline stage keeps, and the runtime
  (RUNTIME_CPU, DATASETS_CPU, TRAINING_CPU: fitted on the fit set of docs/memory_runs.json, checked on its
  test set)
  + the framework's baseline: the RSS of a process that imported torch, deepspeed, transformers and datasets,
  measured once per machine and cached in $LABS_CACHE_DIR/memory_baseline.json.
Measured (`PeakMeter`, in every rank): CPU, the high-water resident memory (VmHWM) after the first
PEAK_STEPS optimizer steps minus the rank's own RSS after those imports; GPU, torch.cuda.max_memory_allocated.
The worker writes both, and their ratio, into metrics.jsonl (kind "memory") and summary.json ("memory").

`zero_model_state_bytes` is DeepSpeed's own mixed-precision estimator written out (stages 2 and 3 equal
`estimate_zero2/3_model_states_mem_needs`, tests assert it), kept for `Plan.memory()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from launcher.common.files import MiB
from launcher.config.ds.load import offload, precision, wants_activation_checkpointing, zero_stage
from launcher.estimate.shape import Shape


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


BUILT_BYTES = 4
"""Every rank builds the whole HF model in fp32 (tasks build it from config or load it) before the engine
wraps it: pipeline ranks keep it whole (the HF model stays referenced), ZeRO and AutoTP replace its storage."""


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
    adam: str = "fused"  # torch's AdamW kernel: "fused", "foreach" or "for-loop" (torch's CPU default)
    datasets: bool = True  # the data comes through datasets.load_dataset (all but the built-in text sample)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.sp

    @classmethod
    def of(cls, cfg: dict[str, Any], layout, seq: int, trainable: int | None = None,
           device: str | None = None) -> Setup:
        zero = cfg.get("zero_optimization") or {}
        off_opt, off_param = offload(cfg)

        def num(key: str, default: int) -> int:
            v = zero.get(key, default)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
        dev = device or ("cpu" if os.environ.get("DS_ACCELERATOR", "cpu") == "cpu" else "cuda")
        opt = (cfg.get("optimizer") or {}).get("params") or {}
        # torch.optim.AdamW through "torch_adam": fused if asked, else foreach on GPUs and the for-loop on CPU
        # (torch's defaults); DeepSpeed's own Adam kernels (FusedAdam, DeepSpeedCPUAdam) update in place
        adam = ("fused" if opt.get("fused") or not opt.get("torch_adam") else "foreach" if opt.get("foreach")
                else "for-loop" if dev == "cpu" else "foreach")
        pipe_ckpt = (cfg.get("pipeline") or {}).get("activation_checkpoint_interval", 0) if layout.pp > 1 else 0
        return cls(stage=zero_stage(cfg), precision=precision(cfg), offload_optimizer=off_opt,
                   offload_param=off_param, dp=layout.dp, tp=layout.tp, pp=layout.pp, sp=getattr(layout, "sp", 1),
                   micro=int(cfg["train_micro_batch_size_per_gpu"]), seq=seq,
                   grad_accum=int(cfg["gradient_accumulation_steps"]),
                   checkpointing=wants_activation_checkpointing(cfg) or bool(pipe_ckpt),
                   reduce_bucket=num("reduce_bucket_size", 500_000_000),
                   allgather_bucket=num("allgather_bucket_size", 500_000_000),
                   prefetch=num("stage3_prefetch_bucket_size", 50_000_000),
                   max_live=num("stage3_max_live_parameters", 1_000_000_000),
                   device=dev,
                   trainable=trainable, adam=adam)


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
    buffers at the start of the backward pass on the stage holding the head). Counted, not fitted: the
    tensors autograd saves in HF's Llama with SDPA (tests/test_memory_predict.py counts them with
    torch.autograd.graph.saved_tensors_hooks on the real model): per token and block 8h + 2kv + 4i elements:
    each RMSNorm's input, normalised and scaled output (3h, twice), the rotated q (h) and k, v (kv each: SDPA
    takes the KV heads as they are), the attention output (h), gate/up/SiLU/product of the MLP (4i); outside
    the blocks the embedding output and the final norm (3h). With activation checkpointing only each block's
    input (h) and one block recomputed. Logits: 16 B per token and vocabulary entry, the fp32 logits (held by
    the model's output), the log-softmax cross-entropy saves, and at the start of the backward pass the
    gradients of both. AutoTP splits the attention and MLP activations by tp (the norms stay whole, and its
    head's LinearAllreduce gives every rank the full logits); sequence parallelism the tokens."""
    e = 4 if setup.precision == "fp32" else 2
    tokens = setup.micro * setup.seq // setup.sp
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)
    per_block = tokens * e * (6 * h + (2 * h + 2 * kv + 4 * i) // setup.tp)
    acts = blocks * tokens * e * h + per_block if setup.checkpointing else blocks * per_block
    acts += tokens * e * 3 * h  # embedding output, final norm
    logits = tokens * shape.vocab * 16 if last else 0  # AutoTP's head all-reduces full logits on every rank
    return acts, logits


# The fitted constants: set on the fit set of docs/memory_runs.json only (llama-small, fp32, 2 ranks, block 64:
# bench/memory_runs.py), checked on its disjoint test set. The parts no formula above covers.
RUNTIME_CPU = 58 * MiB
"""What a CPU rank adds above the framework's imports before its model: tokenizer, the tokenized data,
gloo, Python objects: the rank's RSS after building the task minus the model's fp32 parameters (58 MiB for
llama-tiny on the built-in text sample)."""


DATASETS_CPU = 67 * MiB
"""Data read through `datasets.load_dataset` (every source but the built-in text sample): its tables and
builder; with RUNTIME_CPU the fit set's "built" phase (121-122 MiB for llama-small on WikiText-2)."""


TRAINING_CPU = 75 * MiB
"""What a CPU rank's training adds beyond every tensor counted here: glibc's fragmentation, autograd's and
DeepSpeed's objects, gloo's buffers. Fitted: the mean of (measured - predicted without it) over the fit set's
rank peaks (tests/test_memory_predict.py recomputes it from docs/memory_runs.json)."""


MMAP_MAX = 32 * MiB
"""glibc's largest mmap threshold: a freed tensor above it goes back to the OS, one below it stays in the heap."""


ZERO3_HEAP_COPIES = 3.7
"""ZeRO-3 (without zero.Init) gathers every full parameter in the forward and backward passes and holds its full
gradient until the reduce-scatter: the tensors of 16-32 MiB (fp32) among them stay in glibc's heap when freed,
this many copies of them (measured: llama-small's 31 MiB embedding and head; llama-58m's 62 MiB ones are
mmapped and returned, and nothing is left)."""


def optimizer_temporaries(setup: Setup, updated: int, largest: int) -> int:
    """What torch's AdamW allocates during the step, from its source (torch/optim/adam.py): the fused kernel
    updates in place (nothing); foreach takes the square root of every second moment at once (one fp32 copy of
    what the rank updates); the for-loop (torch's default on CPU) makes the root and its quotient one tensor at
    a time (two copies of the largest tensor it updates: ZeRO's optimizers update one flat fp32 partition)."""
    if setup.adam == "fused":
        return 0
    if setup.adam == "foreach":
        return 4 * updated
    return 2 * 4 * (updated if setup.stage >= 1 else min(largest, updated))


def head_gradient(shape: Shape, setup: Setup) -> int:
    """The first tensor the backward pass makes after the loss's: the output layer's weight gradient (vocabulary x
    hidden, fp32), while the logits and their gradient are alive (8 of the 16 B per token and vocabulary entry).
    When every one of those tensors fits glibc's heap (MMAP_MAX) the freed log-softmax and its gradient stay
    resident beside it: all of it adds; when they are mmapped, only what exceeds the 8 B freed does."""
    grad = 4 * shape.vocab * shape.hidden // setup.tp
    logit_tensor = 4 * setup.micro * setup.seq // setup.sp * shape.vocab
    if max(grad, logit_tensor) <= MMAP_MAX:
        return grad
    return max(grad - 2 * logit_tensor, 0)


def heap_kept(shape: Shape, params: int) -> int:
    """Bytes of `params` parameters (fp32) whose tensors glibc keeps in its heap once freed: all but those
    above its largest mmap threshold (MMAP_MAX), which go back to the OS (the embeddings and head of the
    larger models)."""
    big = sum(n for n in (shape.embed, shape.head) if 4 * n > MMAP_MAX)
    return 4 * max(params - big, 0)


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
    if last:
        parts["logits + loss: the head's weight gradient"] = head_gradient(shape, setup)
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
    parts["optimizer step temporaries"] = optimizer_temporaries(setup, opt_p, shape.embed // setup.tp)
    if setup.stage in (1, 2) and setup.device == "cpu":  # the parameters as built, freed once flattened
        parts["ZeRO flat copies (the parameters as built, kept in the heap)"] = heap_kept(shape, trained)
    if setup.stage == 3 and setup.device == "cpu":
        band = sum(n for n in (shape.embed, shape.head) if MMAP_MAX // 2 < 4 * n <= MMAP_MAX)
        parts["ZeRO-3 gathers kept in the heap"] = int(ZERO3_HEAP_COPIES * 4 * band)
    if setup.device == "cpu":
        parts["runtime (data, tokenizer, gloo)"] = RUNTIME_CPU + (DATASETS_CPU if setup.datasets else 0)
        parts["runtime of the training (fitted)"] = TRAINING_CPU
        full = shape.params
        if setup.pp > 1:  # the rest of the HF model stays referenced on every stage
            parts["the HF model's other stages"] = BUILT_BYTES * (full - P)
        elif setup.tp > 1 or setup.stage == 3:  # the whole model built before AutoTP / ZeRO-3 replaced it
            parts["the HF model as built (kept in the heap)"] = heap_kept(shape, full)
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
