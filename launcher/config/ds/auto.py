""""auto" in a DeepSpeed config, resolved where the HF Trainer resolves it (transformers/integrations/
deepspeed.py, `HfTrainerDeepSpeedConfig.trainer_config_process` and `trainer_config_finalize`), from the
job, the model's hidden size and the layout; its defaults are `TrainingArguments`' (`JOB_DEFAULTS`).
DeepSpeed's pydantic models drop any other "auto" silently (their default applies), so any other is refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

from launcher.common.errors import LabsError
from launcher.config.ds.load import BATCH_KEYS, _dotted, _walk, get_path, strip_comments
from launcher.config.ds.optim import machine_bf16, machine_bf16_reason

JOB_DEFAULTS: dict[str, Any] = {
    "lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 0,
    "total_steps": None, "max_grad_norm": 1.0, "micro_batch": 8, "grad_accum": 1, "bf16": False, "fp16": False,
}
"""What `resolve_auto` takes from `job_values`, with the HF Trainer's defaults (TrainingArguments:
learning_rate, adam_beta1/2, adam_epsilon, weight_decay, warmup_steps, max_steps (no default: the
Trainer counts the data), max_grad_norm, per_device_train_batch_size, gradient_accumulation_steps,
bf16, fp16) for keys the job leaves out or sets to None."""


MODE_DEFAULTS: dict[bool, dict[str, Any]] = {
    True: {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.01},
    False: {"lr": 5e-5, "warmup_steps": 10, "weight_decay": 0.0},
}
"""The defaults that depend on what the run is (job_values["from_scratch"], the job's train.from_scratch):
from scratch, what the shipped configs hard-coded before they said "auto" (a random model learns fast at 3e-3);
fine-tuning, the HF Trainer's lr 5e-5 and weight decay 0 with a 10-step warm-up (the Trainer's own default is
none; DeepSpeed 0.19 refuses 0 steps anyway). Without from_scratch: JOB_DEFAULTS (the HF Trainer's)."""

MODE_KEYS = frozenset({"from_scratch", "mode_why"})
"""job_values keys that say what the run is (not values of a config key): from_scratch (bool or None) and why."""


def job_values(train: Any, from_scratch: bool | None = None, mode_why: str = "") -> dict[str, Any]:
    """The job_values of `resolve_auto` from a job's train section (and what the run is, see MODE_DEFAULTS)."""
    values = {key: getattr(train, field.split(".", 1)[1]) for key, field in JOB_FIELDS.items()}
    return values | {"from_scratch": from_scratch, "mode_why": mode_why}


JOB_FIELDS: dict[str, str] = {
    "lr": "train.lr", "betas": "train.betas", "eps": "train.eps", "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps", "total_steps": "train.max_steps", "max_grad_norm": "train.max_grad_norm",
    "micro_batch": "train.micro_batch", "grad_accum": "train.grad_accum", "bf16": "train.bf16", "fp16": "train.fp16",
}
"""The job field each job_values key comes from, as the notes name it."""


DS_NATIVE_AUTO = frozenset({"pipeline.stages", "data_types.keep_in_fp32_modules"})
"""Keys where "auto" is DeepSpeed's own value (its defaults; tests check them against DeepSpeed)."""


HIDDEN_KEYS = {  # DeepSpeed's field name and its alias both count
    "reduce_bucket_size": ("hidden*hidden", lambda h: h * h),
    "stage3_prefetch_bucket_size": ("0.9*hidden*hidden", lambda h: int(0.9 * h * h)),
    "prefetch_bucket_size": ("0.9*hidden*hidden", lambda h: int(0.9 * h * h)),
    "stage3_param_persistence_threshold": ("10*hidden", lambda h: 10 * h),
    "param_persistence_threshold": ("10*hidden", lambda h: 10 * h),
}


def find_auto(cfg: Any) -> list[str]:
    """Dotted keys whose value is "auto", except where "auto" is DeepSpeed's own value."""
    return [_dotted(p) for p, v in _walk(cfg) if v == "auto" and _dotted(p) not in DS_NATIVE_AUTO]


def _refuse_auto(cfg: dict[str, Any], path: str) -> None:
    left = find_auto(cfg)
    if left:
        raise LabsError(
            f"{path}: {left[0]} = \"auto\", which nothing resolves"
            + (f" (nor {', '.join(left[1:])})" if len(left) > 1 else "")
            + "; DeepSpeed would silently use its default. \"auto\" is filled only where the HF Trainer "
            "fills it (the batch triad, optimizer lr/betas/eps/weight_decay, scheduler warmup_min_lr/"
            "warmup_max_lr/warmup_num_steps/total_num_steps, gradient_clipping, fp16/bf16 enabled, "
            "zero_optimization reduce_bucket_size/stage3_prefetch_bucket_size/"
            "stage3_param_persistence_threshold); write a value there"
        )


FROM_JOB: tuple[tuple[str, str], ...] = (
    ("gradient_clipping", "max_grad_norm"),
    ("optimizer.params.lr", "lr"),
    ("optimizer.params.betas", "betas"),
    ("optimizer.params.eps", "eps"),
    ("optimizer.params.weight_decay", "weight_decay"),
    ("fp16.enabled", "fp16"),
    ("bf16.enabled", "bf16"),
    ("bfloat16.enabled", "bf16"),
)
"""Dotted config key -> the job value it takes when "auto" (the HF Trainer's `fill_match` lines)."""

FIXED: dict[str, tuple[Any, str]] = {
    "scheduler.params.warmup_min_lr": (0, "0 as the HF Trainer sets it"),
    # accelerate's DeepSpeedPlugin fills it from zero3_save_16bit_model (default false): labs exports the
    # consolidated fp32 weights itself (zero_to_fp32), so nothing needs the 16-bit gather at save time
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": (
        False, "false as accelerate's zero3_save_16bit_model defaults; labs exports the fp32 weights itself"),
}
"""Dotted config key -> the value "auto" takes there regardless of the job, and why."""


class _Filler:
    """One resolve_auto call: the config being filled, the notes, and where each job value comes from."""

    def __init__(self, cfg: dict[str, Any], path: str, job_values: dict[str, Any], accelerator: str):
        unknown = set(job_values) - set(JOB_DEFAULTS) - MODE_KEYS
        if unknown:
            raise TypeError(f"resolve_auto: unknown job_values keys {sorted(unknown)}; expected {sorted(JOB_DEFAULTS)}")
        self.out, self.path, self.job_values, self.accelerator = strip_comments(cfg), path, job_values, accelerator
        self.notes: list[str] = []

    def job(self, key: str) -> tuple[Any, str]:
        value = self.job_values.get(key)
        if value is not None:
            return value, f"from the job's {JOB_FIELDS[key]}"
        mode = self.job_values.get("from_scratch")
        if mode is not None and key in MODE_DEFAULTS[mode]:
            what = "training from scratch" if mode else "fine-tuning"
            return MODE_DEFAULTS[mode][key], f"the default for {what}; set {JOB_FIELDS[key]} in the job to choose"
        return JOB_DEFAULTS[key], f"the HF Trainer's default; set {JOB_FIELDS[key]} in the job to choose"

    def fill(self, keys: tuple[str, ...], value: Any, why: str) -> None:
        get_path(self.out, keys[:-1])[keys[-1]] = value
        self.notes.append(f"{_dotted(keys)} = {value!r} ({why})")

    def is_auto(self, keys: tuple[str, ...]) -> bool:
        return get_path(self.out, keys) == "auto"

    def batch(self, dp: int) -> None:
        """The batch triad: the job's micro batch and accumulation when the config has none, then the third."""
        out, (tb_k, mb_k, ga_k) = self.out, BATCH_KEYS

        def unset(k: str) -> bool:
            return out.get(k) is None or out.get(k) == "auto"

        def why(k: str, how: str) -> str:
            return f"{'auto' if self.is_auto((k,)) else 'not set'}{how}"

        for key, jkey, when in ((mb_k, "micro_batch", unset(mb_k) and unset(tb_k)),
                                (ga_k, "grad_accum", unset(ga_k) and (unset(tb_k) or unset(mb_k)))):
            if when:
                value, src = self.job(jkey)
                self.fill((key,), value, why(key, f", {src}"))
        tb, mb, ga = (out.get(k) for k in BATCH_KEYS)
        if unset(tb_k) and _positive(mb) and _positive(ga):
            self.fill((tb_k,), mb * ga * dp, why(tb_k, f": micro batch {mb} x grad accum {ga} x data-parallel {dp}"))
        elif unset(mb_k) and _positive(tb) and _positive(ga) and tb % (ga * dp) == 0:
            self.fill((mb_k,), tb // (ga * dp), why(mb_k, f": train_batch_size {tb} / (grad accum {ga} x data-parallel {dp})"))
        elif unset(ga_k) and _positive(tb) and _positive(mb) and tb % (mb * dp) == 0:
            self.fill((ga_k,), tb // (mb * dp), why(ga_k, f": train_batch_size {tb} / (micro batch {mb} x data-parallel {dp})"))

    def from_job(self) -> None:
        for dotted, jkey in FROM_JOB:
            keys = tuple(dotted.split("."))
            if not isinstance(get_path(self.out, keys[:-1]), dict) or not self.is_auto(keys):
                continue
            value, src = self.job(jkey)
            if jkey in ("bf16", "fp16"):
                if value == "auto":  # the job leaves it to the machine
                    value, src = machine_bf16(self.accelerator), f"{src} = auto: {machine_bf16_reason(self.accelerator)}"
                value = bool(value)
            self.fill(keys, list(value) if jkey == "betas" else value, f"auto, {src}")
        for dotted, (value, why) in FIXED.items():
            keys = tuple(dotted.split("."))
            if isinstance(get_path(self.out, keys[:-1]), dict) and self.is_auto(keys):
                self.fill(keys, value, f"auto, {why}")

    def scheduler(self) -> None:
        sched = ("scheduler", "params")
        if not isinstance(get_path(self.out, sched), dict):
            return
        lr, lr_src = self.job("lr")
        if self.is_auto(sched + ("warmup_max_lr",)):
            self.fill(sched + ("warmup_max_lr",), lr, f"auto, the learning rate, {lr_src}")
        total, total_src = self.job("total_steps")
        if self.is_auto(sched + ("total_num_steps",)):
            if total is None:
                raise LabsError(
                    f"{self.path}: scheduler.params.total_num_steps = \"auto\" needs the number of optimizer steps of "
                    f"the run, which the plan knows only from the job's {JOB_FIELDS['total_steps']}; set it "
                    f"(--set {JOB_FIELDS['total_steps']}=N) or write a number here")
            self.fill(sched + ("total_num_steps",), int(total), f"auto, {total_src}")
        if self.is_auto(sched + ("warmup_num_steps",)):
            warm, warm_src = self.job("warmup_steps")
            if isinstance(warm, float) and 0 < warm < 1:  # a ratio, as HF's get_warmup_steps reads it
                if total is None:
                    raise LabsError(f"{self.path}: scheduler.params.warmup_num_steps = \"auto\" with a warmup ratio "
                                    f"{warm} needs {JOB_FIELDS['total_steps']}; set it, or give warmup steps")
                warm = math.ceil(total * warm)
            self.fill(sched + ("warmup_num_steps",), max(1, int(warm)),
                      f"auto, max(1, {warm}), {warm_src}; DeepSpeed 0.19 refuses 0 warmup steps")

    def buckets(self, hidden_size: int | None) -> None:
        zero = self.out.get("zero_optimization")
        if not isinstance(zero, dict):
            return
        autos = [k for k in HIDDEN_KEYS if zero.get(k) == "auto"]
        if autos and hidden_size is None:
            raise LabsError(
                f"{self.path}: zero_optimization.{autos[0]} = \"auto\" is computed from the model's hidden size "
                f"({HIDDEN_KEYS[autos[0]][0]}, as the HF Trainer does), which is unknown until this model is "
                f"loaded (a hub model); write a number there, e.g. 5e7")
        for k in autos:
            formula, fn = HIDDEN_KEYS[k]
            self.fill(("zero_optimization", k), fn(hidden_size),
                      f"auto, {formula} with the model's hidden size {hidden_size}")


def resolve_auto(cfg: dict[str, Any], path: str, *, dp: int, hidden_size: int | None,
                 job_values: dict[str, Any], accelerator: str = "cpu") -> tuple[dict[str, Any], list[str]]:
    """The config with every "auto" resolved, and one note per value filled ("optimizer.params.lr =
    5e-05 (auto, from the job's train.lr)"). Keys of `job_values` (see JOB_DEFAULTS / JOB_FIELDS):
    lr, betas, eps, weight_decay, warmup_steps, total_steps (optimizer steps of the run), max_grad_norm,
    micro_batch, grad_accum, bf16, fp16; a missing or None one takes the HF Trainer's default.
    `dp` is the data-parallel size, `hidden_size` the model's (None when unknown before loading).
    Any "auto" the HF Trainer would not fill is a LabsError naming the key. Comment keys are dropped."""
    f = _Filler(cfg, path, job_values, accelerator)
    f.batch(dp)
    f.from_job()
    f.scheduler()
    f.buckets(hidden_size)
    _refuse_auto(f.out, path)
    return f.out, f.notes


def _positive(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def hparams_line(cfg: dict[str, Any], filled: list[str], train: Any, mode_why: str) -> str:
    """The plan's line of the resolved learning rate, warm-up and steps, each with where it came from:
    "hyper-parameters (fine-tuning: ...): lr 5e-05 (auto, ...), warm-up 10 steps (...), steps 20 (...)".
    `filled` are resolve_auto's notes; a value no note names was written in the DeepSpeed config."""
    def source(dotted: str) -> str:
        note = next((n for n in filled if n.startswith(f"{dotted} = ")), None)
        if not note:
            return f"{dotted}, written in the DeepSpeed config"
        why = re.sub(r"^auto, (the learning rate, )?(max\(1, [^)]*\), )?", "", note[note.index(" (") + 2:-1])
        return why.replace("; DeepSpeed 0.19 refuses 0 warmup steps", "")

    sched = cfg.get("scheduler") if isinstance(cfg.get("scheduler"), dict) else {}
    params = sched.get("params") if isinstance(sched.get("params"), dict) else {}
    opt = cfg.get("optimizer", {}).get("params", {}) if isinstance(cfg.get("optimizer"), dict) else {}
    if "warmup_max_lr" in params:  # DeepSpeed's warm-up schedulers set the lr themselves: this is the peak
        parts = [f"lr {params['warmup_max_lr']:g} ({source('scheduler.params.warmup_max_lr')})"]
    else:
        parts = [f"lr {opt.get('lr', '?')} ({source('optimizer.params.lr')})"]
    if "warmup_num_steps" in params:
        warm = params["warmup_num_steps"]
        parts.append(f"warm-up {warm} step{'' if warm == 1 else 's'} ({source('scheduler.params.warmup_num_steps')}; "
                     f"{params.get('warmup_type', 'log')} from {params.get('warmup_min_lr', 0)}, {sched.get('type')})")
    if "total_num_steps" in params:
        parts.append(f"decay over {params['total_num_steps']} steps ({source('scheduler.params.total_num_steps')})")
    if train.max_steps:
        parts.append(f"steps {train.max_steps} (train.max_steps; fewer if {train.epochs} epoch(s) of the data "
                     f"give fewer)")
    else:
        parts.append(f"steps: {train.epochs} epoch(s) of the data, counted by the ranks (set train.max_steps "
                     f"to fix them)")
    return f"hyper-parameters ({mode_why}): " + ", ".join(parts)
