"""Precision, optimizer and scheduler of a DeepSpeed config, mirrored from `DeepSpeedEngine._configure_basic_optimizer`,
`get_optimizer_configuration` and `_scheduler_from_config`: which class each type builds on this accelerator,
its parameters bound to that class, values checked by torch's own constructors. fp16 on CPU refused (no fast
fp16 kernels on CPUs); bf16 on a CPU only with avx512_bf16 or amx_bf16 in /proc/cpuinfo. And the ops a config
makes DeepSpeed JIT-build (`ops_needed`), with the build times measured in shared/DEEPSPEED-CPU.md.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

from launcher.common.errors import LabsError
from launcher.common.proc import extensions_dir
from launcher.config.ds.load import get_path, offload, zero_stage
from launcher.config.ds.parser import _unknown_message

CPUINFO = Path("/proc/cpuinfo")


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: Path | None = None) -> bool | None:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16, False when it lists neither, None
    when it cannot be read (not Linux)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(f in flags for f in BF16_FLAGS)


def machine_bf16(accelerator: str) -> bool:
    """Whether this machine computes bf16 fast: a CPU listing amx_bf16 or avx512_bf16 (docs/benchmarks.md:
    1.4-1.5x fp32's tokens/s on llama-small there), a CUDA GPU that supports bf16 (Ampere and later)."""
    if accelerator == "cpu":
        return cpu_has_bf16() is True
    try:
        # keeps torch and DeepSpeed out of the labs process
        import torch
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001 - no torch/CUDA to ask: fp32, which always works
        return False


def machine_bf16_reason(accelerator: str) -> str:
    if accelerator == "cpu":
        has = cpu_has_bf16()
        return (f"this CPU lists {'/'.join(BF16_FLAGS)}" if has else
                f"this CPU lists neither {' nor '.join(BF16_FLAGS)}: fp32" if has is False else
                f"{CPUINFO} unreadable: fp32")
    return "the GPU supports bf16" if machine_bf16(accelerator) else "no bf16 support found on the GPU: fp32"


def _precision(cfg: dict[str, Any], path: str, accelerator: str) -> None:
    bf16_key = "bf16" if "bf16" in cfg else "bfloat16"
    fp16 = get_path(cfg, ("fp16", "enabled")) is True
    bf16 = get_path(cfg, (bf16_key, "enabled")) is True
    autocast = cfg.get("torch_autocast") if isinstance(cfg.get("torch_autocast"), dict) else {}
    autocast_fp16 = autocast.get("enabled") is True and str(autocast.get("dtype", "")).lower() in (
        "fp16", "float16", "half", "torch.float16")
    if accelerator != "cpu":
        return
    has_bf16 = cpu_has_bf16()
    if fp16 or autocast_fp16:
        field = "fp16.enabled = True" if fp16 else f"torch_autocast.dtype = {autocast.get('dtype')!r}"
        off = "fp16.enabled" if fp16 else "torch_autocast.enabled"
        has = "this CPU has" if has_bf16 else "on a CPU with"
        fix = (f"use bf16 instead (\"bf16\": {{\"enabled\": true}}; {has} {'/'.join(BF16_FLAGS)}), or fp32 "
               f"(set {off} to false)" if has_bf16 is not False else
               f"use fp32: set {off} to false (this CPU has no bf16 support either: neither {' nor '.join(BF16_FLAGS)})")
        raise LabsError(f"{path}: {field} on CPU: DeepSpeed would train in float16, which CPUs have no fast "
                        f"kernels for (slower than fp32, with loss scaling to manage); {fix}")
    if bf16 and has_bf16 is False:
        raise LabsError(f"{path}: {bf16_key}.enabled = True, but this CPU lists neither {' nor '.join(BF16_FLAGS)} "
                        f"in {CPUINFO}: bfloat16 matmuls would be emulated, many times slower than fp32; set "
                        f"{bf16_key}.enabled to false (fp32), or run on a CPU with AVX512-BF16/AMX")


NO_OPTIMIZER_FIX = ('add "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", '
                    '"weight_decay": "auto", "torch_adam": true}} (the "auto" values come from the job)')


def _optimizer_section(cfg: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The config's optimizer type and a copy of its params, their types checked as torch would need them."""
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict) or opt.get("type") is None:
        what = "no \"optimizer\" section" if opt is None else f"optimizer = {opt!r} has no \"type\""
        raise LabsError(f"{path}: {what}; labs' ranks give deepspeed.initialize no optimizer of their own, so "
                        f"DeepSpeed would build none and stop at initialize (ZeRO) or at the first backward; {NO_OPTIMIZER_FIX}")
    name = opt["type"]
    if not isinstance(name, str):
        raise LabsError(f"{path}: optimizer.type = {name!r}; write a name such as \"AdamW\"")
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise LabsError(f"{path}: optimizer.params = {params!r}; it must be an object of the optimizer's arguments")
    params = dict(params)
    if "max_grad_norm" in params:
        raise LabsError(f"{path}: optimizer.params.max_grad_norm = {params['max_grad_norm']!r}: DeepSpeed refuses it "
                        f"as an optimizer parameter; remove it and set the top-level \"gradient_clipping\" instead")
    for key in ("lr", "eps", "weight_decay"):
        if key in params and (isinstance(params[key], (bool, str)) or not isinstance(params[key], (int, float))):
            raise LabsError(f"{path}: optimizer.params.{key} = {params[key]!r} is not a number; torch would fail on it "
                            f"at the first step; write a number")
    betas = params.get("betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise LabsError(f"{path}: optimizer.params.betas = {betas!r}; write two numbers, e.g. [0.9, 0.999]")
    return name, params


def _optimizer_class(cfg: dict[str, Any], path: str, accelerator: str) -> tuple[Any, dict[str, Any]]:
    """(the class DeepSpeed builds for the config's optimizer or None for Muon, the parameters it
    passes), as DeepSpeedEngine._configure_basic_optimizer / get_optimizer_configuration do."""
    # keeps torch and DeepSpeed out of the labs process
    import torch

    # keeps torch and DeepSpeed out of the labs process
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    name, params = _optimizer_section(cfg, path)
    lname = name.lower() if name.lower() in DEEPSPEED_OPTIMIZERS else name
    off = offload(cfg)[0]
    on_cpu = accelerator == "cpu"
    if lname in ("adam", "adamw", "muon"):
        adam_w_mode = params.pop("adam_w_mode", True)
        torch_adam = params.pop("torch_adam", False)
        params.pop("fp32_optimizer_states", None)
        if lname == "muon":
            return None, params
        if torch_adam:
            params.pop("foreach", None)
            return (torch.optim.AdamW if lname == "adamw" or adam_w_mode else torch.optim.Adam), params
        if off:
            # keeps torch and DeepSpeed out of the labs process
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam, params
        # keeps torch and DeepSpeed out of the labs process
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam, params
    if lname == "adagrad":
        if off:
            # keeps torch and DeepSpeed out of the labs process
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
            return DeepSpeedCPUAdagrad, params
        return torch.optim.Adagrad, params
    if lname == "lion":
        if off:
            # keeps torch and DeepSpeed out of the labs process
            from deepspeed.ops.lion import DeepSpeedCPULion
            return DeepSpeedCPULion, params
        if on_cpu:
            raise LabsError(f"{path}: optimizer.type = {name!r} without optimizer offload builds FusedLion, which "
                            f"DeepSpeed does not implement on CPU; offload the optimizer "
                            f"(zero_optimization.offload_optimizer.device = \"cpu\") or use \"AdamW\"")
        # keeps torch and DeepSpeed out of the labs process
        from deepspeed.ops.lion import FusedLion
        return FusedLion, params
    if lname == "lamb":
        if on_cpu:
            raise LabsError(f"{path}: optimizer.type = {name!r} builds FusedLamb, which DeepSpeed does not implement "
                            f"on CPU; use \"AdamW\" (with \"torch_adam\": true) or a torch.optim optimizer")
        # keeps torch and DeepSpeed out of the labs process
        from deepspeed.ops.lamb import FusedLamb
        return FusedLamb, params
    if lname in ("muadam", "muadamw", "musgd"):
        if importlib.util.find_spec("mup") is None:
            raise LabsError(f"{path}: optimizer.type = {name!r} needs the `mup` package, which is not installed; "
                            f"pip install mup, or use \"AdamW\"")
        import mup  # imported only when the config asks for it (an optional package)
        return getattr(mup, {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}[lname]), params
    if not hasattr(torch.optim, name) or not isinstance(getattr(torch.optim, name), type):
        choices = sorted(set(DEEPSPEED_OPTIMIZERS) | {n for n in dir(torch.optim) if n[0].isupper()
                                                      and isinstance(getattr(torch.optim, n), type)})
        close = [c for c in choices if c.lower() == name.lower()] or difflib.get_close_matches(name, choices, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(choices)}"
        raise LabsError(f"{path}: optimizer.type = {name!r} is neither a DeepSpeed optimizer nor one of torch.optim "
                        f"(DeepSpeed would fail with AttributeError); {hint}")
    return getattr(torch.optim, name), params


def _check_optimizer(cfg: dict[str, Any], path: str, accelerator: str) -> Any:
    """Mirror DeepSpeed's optimizer construction; returns a torch optimizer on a dummy parameter with
    the config's learning rate (for the scheduler check)."""
    # keeps torch and DeepSpeed out of the labs process
    import torch
    cls, params = _optimizer_class(cfg, path, accelerator)
    name = cfg["optimizer"]["type"]
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    if cls is not None:
        try:
            inspect.signature(cls).bind(dummy, **params)
        except TypeError:
            known = [p for p in inspect.signature(cls).parameters if p not in ("self", "params", "model_params")]
            bad = next(k for k in params if k not in known)
            raise LabsError(_unknown_message(path, ("optimizer", "params", bad), params[bad], known)
                            .replace("DeepSpeed would ignore it silently", f"{cls.__name__} does not take it")) from None
    # the values, by torch's own checks: the real class when it is torch's, else AdamW on the common ones
    real = cls is not None and cls.__module__.startswith("torch.optim")
    probe_cls = cls if real else torch.optim.AdamW
    probe = params if real else {k: v for k, v in params.items() if k in ("lr", "betas", "eps", "weight_decay")}
    try:
        opt = _construct(probe_cls, dummy, probe)
    except (ValueError, TypeError, RuntimeError) as e:
        field = next((k for k in ("lr", "betas", "eps", "weight_decay", "momentum") if k in params and
                      (k in str(e) or {"lr": "learning rate", "betas": "beta", "eps": "epsilon"}.get(k, "@") in str(e))),
                     None)
        where = f"optimizer.params.{field} = {params[field]!r}" if field else f"optimizer.params = {params!r}"
        raise LabsError(f"{path}: {where}: {name} refuses it ({e}); write a valid number") from None
    # ZeRO runs only the optimizers DeepSpeed tested unless told otherwise (engine._do_optimizer_sanity_check)
    if zero_stage(cfg) > 0 and cls is not None and not cfg.get("zero_allow_untested_optimizer", False):
        # keeps torch and DeepSpeed out of the labs process
        from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
        if not any(issubclass(cls, s) for s in ZERO_SUPPORTED_OPTIMIZERS):
            raise LabsError(f"{path}: optimizer.type = {name!r} with zero_optimization.stage = {zero_stage(cfg)}: "
                            f"DeepSpeed refuses an untested ZeRO optimizer ({cls.__name__}); add "
                            f"\"zero_allow_untested_optimizer\": true, or use \"AdamW\"")
    return opt


def _construct(cls: Any, params: list[Any], kwargs: dict[str, Any]) -> Any:
    """`cls(params, **kwargs)` for a torch.optim class, without `Optimizer.add_param_group`: torch wraps
    that in `_disable_dynamo`, whose first call imports torch._dynamo (1.5 s here, a third of `labs plan`).
    The class's own value checks run in its `__init__` before `Optimizer.__init__` takes the parameters;
    an empty list stops it there, and the one group the parameters would form is then added with the
    defaults filled in, as add_param_group does."""
    opt = cls.__new__(cls)
    try:
        cls.__init__(opt, [], **kwargs)
    except ValueError as e:
        if "empty parameter list" not in str(e):
            raise
    opt.param_groups.append({**opt.defaults, "params": list(params)})
    return opt


def _check_scheduler(cfg: dict[str, Any], path: str, optimizer: Any) -> None:
    """Build the scheduler as DeepSpeedEngine._scheduler_from_config does, on the probe optimizer."""
    # keeps torch and DeepSpeed out of the labs process
    import torch

    # keeps torch and DeepSpeed out of the labs process
    from deepspeed.runtime import lr_schedules
    sched = cfg.get("scheduler")
    if sched is None:
        return
    if not isinstance(sched, dict) or not isinstance(sched.get("type"), str):
        raise LabsError(f"{path}: scheduler = {sched!r}; it needs a \"type\" such as \"WarmupLR\" and \"params\"")
    name, params = sched["type"], sched.get("params") or {}
    if hasattr(lr_schedules, name):
        cls = getattr(lr_schedules, name)
    elif hasattr(torch.optim.lr_scheduler, name):
        cls = getattr(torch.optim.lr_scheduler, name)
    else:
        close = difflib.get_close_matches(name, lr_schedules.VALID_LR_SCHEDULES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(lr_schedules.VALID_LR_SCHEDULES)} " \
                                                            f"or a torch.optim.lr_scheduler class"
        raise LabsError(f"{path}: scheduler.type = {name!r}: DeepSpeed does not recognize this LR scheduler; {hint}")
    if not isinstance(params, dict):
        raise LabsError(f"{path}: scheduler.params = {params!r}; it must be an object of {name}'s arguments")
    known = [p for p in inspect.signature(cls).parameters if p not in ("self", "optimizer")]
    bad = next((k for k in params if k not in known), None) if "kwargs" not in known else None
    if bad is not None:
        raise LabsError(_unknown_message(path, ("scheduler", "params", bad), params[bad], known)
                        .replace("DeepSpeed would ignore it silently", f"{name} does not take it"))
    try:
        cls(optimizer, **params)
    except (ValueError, TypeError, AssertionError, KeyError, ZeroDivisionError) as e:
        field = next((k for k in params if k in str(e)), None)
        where = f"scheduler.params.{field} = {params[field]!r}" if field else f"scheduler.params = {params!r}"
        raise LabsError(f"{path}: {where}: {name} refuses it ({e}); write a valid value") from None


OP_BUILD_SECONDS = {"cpu_adam": 155, "fused_adam": 112, "cpu_adagrad": 155, "cpu_lion": 155, "async_io": 60,
                    "fused_lion": 120, "fused_lamb": 120}
"""One-time JIT build, seconds on 2 cores: cpu_adam and fused_adam measured (shared/DEEPSPEED-CPU.md);
the others are estimates from their size (cpu_adagrad and cpu_lion share cpu_adam's sources)."""


def ops_needed(cfg: dict[str, Any], ext_dir: str | Path | None = None) -> list[tuple[str, int, bool]]:
    """(op, expected one-time build seconds, already built in $TORCH_EXTENSIONS_DIR) for each DeepSpeed
    op this config makes the ranks JIT-build: the optimizer's (cpu_adam for an offloaded Adam, fused_adam
    for Adam/AdamW without "torch_adam": true, ...) and async_io for NVMe offload. The CPU comm op
    every CPU run needs is not listed (launcher.common.proc.comm_op_built)."""
    ops: list[str] = []
    opt = cfg.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("type"), str):
        lname = opt["type"].lower()
        params = opt.get("params") if isinstance(opt.get("params"), dict) else {}
        off = offload(cfg)[0]
        if lname in ("adam", "adamw", "muon") and not params.get("torch_adam", False):
            ops.append("cpu_adam" if off else "fused_adam")
        elif lname == "adagrad" and off:
            ops.append("cpu_adagrad")
        elif lname == "lion":
            ops.append("cpu_lion" if off else "fused_lion")
        elif lname == "lamb":
            ops.append("fused_lamb")
    zero = cfg.get("zero_optimization") if isinstance(cfg.get("zero_optimization"), dict) else {}
    if any((zero.get(k) or {}).get("device") == "nvme" for k in ("offload_optimizer", "offload_param")):
        ops.append("async_io")
    root = Path(ext_dir or extensions_dir())
    return [(op, OP_BUILD_SECONDS[op], (root / op / f"{op}.so").is_file()) for op in ops]
