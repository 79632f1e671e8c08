"""What `labs serve TARGET` serves, resolved without torch: a preset, an HF folder, a hub id, a run
folder (its hf/ export, or a checkpoint exported on demand with --step N), or a PEFT LoRA adapter over
its base; plus the `--lora NAME=PATH` adapters chosen by a request's `model`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.estimate.shape import Shape
from tasks.presets import PRESETS, VOCAB

CAUSAL_ARCHS = ("llama", "mistral", "gpt2")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TARGET_ADAPTER = "\0target"  # the adapter TARGET itself names, until `resolve` gives it the TARGET's name


@dataclass
class Target:
    name: str
    """The id clients put in `model` (the TARGET as given, or --served-model-name)."""
    model: str
    """What the ranks load: a preset name, a folder or a hub id (tasks.causal_lm.build_causal_lm)."""
    source: str
    """One line for the plan: where the weights come from."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Served name -> PEFT adapter folder, each over `model`."""
    shape: Shape | None = None
    context: int | None = None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LabsError(f"{path}: cannot read the {what} ({e}); pass a folder written by save_pretrained()") from None
    if not isinstance(data, dict):
        raise LabsError(f"{path}: the {what} is not a JSON object")
    return data


def _shape(cfg: dict, vocab: int | None) -> tuple[Shape | None, int | None]:
    try:
        shape = Shape.of(cfg, vocab) if vocab else None
    except KeyError:
        shape = None
    return shape, cfg.get("max_position_embeddings") or cfg.get("n_positions")


def _preset(name: str) -> Target:
    cfg = PRESETS[name]
    if cfg["arch"] not in CAUSAL_ARCHS:
        causal = [n for n, c in PRESETS.items() if c["arch"] in CAUSAL_ARCHS]
        raise LabsError(f"TARGET {name!r} is a {cfg['arch']} sequence classifier, not a causal LM; serve one of "
                        f"{', '.join(causal)}, a folder or a run")
    shape, ctx = _shape(cfg, VOCAB.get(cfg["tokenizer"]) or cfg.get("vocab_size"))
    weights = (f"pretrained weights from the pip package {cfg['weights']}" if cfg.get("weights")
               else "built from config, random weights from --seed")
    return Target(name, name, f"preset {name} ({weights}; tokenizer {cfg['tokenizer']})", shape=shape, context=ctx)


def _folder(path: Path) -> Target:
    cfg = _read_json(path / "config.json", "model config")
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise LabsError(f"model folder {str(path)!r} has config.json but no weights (*.safetensors or *.bin); "
                        f"export the model with save_pretrained() (`labs export RUN`)")
    shape, ctx = _shape(cfg, cfg.get("vocab_size"))
    return Target(str(path), str(path), f"HF folder {path} ({cfg.get('model_type', '?')})", shape=shape, context=ctx)


def _hub(name: str) -> Target:
    """A hub id: its snapshot in the HF cache when there is one (served as that folder, offline too);
    else, online, every rank downloads it, once the hub has said it knows the id."""
    # only when TARGET is a hub id (huggingface_hub is torch-free, but slow to import)
    import huggingface_hub as hub

    # only when TARGET is a hub id (submodules: huggingface_hub's attributes are lazy)
    from huggingface_hub import constants, errors
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    fix = (f"download it once where the hub is reachable (`hf download {name}`, into HF_HUB_CACHE "
           f"{constants.HF_HUB_CACHE}), or give a local folder, a run folder or a preset ({', '.join(PRESETS)})")
    try:
        cached = Path(hub.snapshot_download(name, local_files_only=True))
    except (errors.LocalEntryNotFoundError, ValueError, OSError):
        cached = None
    if cached is not None and (cached / "config.json").is_file():
        target = _folder(cached)
        target.source = f"hub model {name} from the HF cache: {target.source.removeprefix('HF folder ')}"
        return target
    if offline:
        raise LabsError(f"TARGET {name!r} is neither a folder nor a preset, so a hub id, and it is not in the HF cache "
                        f"while HF_HUB_OFFLINE=1 (the hub is not asked; unset it if the hub is reachable from here): {fix}")
    try:
        hub.model_info(name, timeout=15)
    except errors.RepositoryNotFoundError:
        raise LabsError(f"TARGET {name!r}: the hub ({constants.ENDPOINT}) has no such model (or it is private: "
                        f"`hf auth login`); check the id, or {fix.partition(', or ')[2]}") from None
    except Exception as e:  # noqa: BLE001 - any failure to reach the hub: connection, timeout, proxy, HTTP 5xx
        raise LabsError(f"TARGET {name!r} is a hub id, not in the HF cache, and the hub ({constants.ENDPOINT}) is "
                        f"unreachable ({type(e).__name__}: {str(e)[:160]}): {fix}") from None
    return Target(name, name, f"hub model {name} (downloaded by every rank into its HF cache)")


def _adapter(path: Path) -> Target:
    cfg = _read_json(path / "adapter_config.json", "PEFT adapter config")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise LabsError(f"{path}/adapter_config.json names no base_model_name_or_path; serve the base with "
                        f"--lora NAME={path}")
    target = resolve_model(str(base))
    target.name = str(base)
    target.adapters[TARGET_ADAPTER] = str(path)
    target.source += f"; TARGET is a PEFT LoRA adapter over it: {path}"
    return target


def export_step(run: Path, step: int) -> Path:
    """RUN/hf-step<N>: the checkpoint of step N in HF format, written once by `labs export` in a child
    process (it builds the task's model: torch stays out of this one)."""
    out = run / f"hf-step{step}"
    if not (out / "config.json").is_file() and not (out / "adapter" / "adapter_config.json").is_file():
        print(f"== exporting {run} step {step} to {out} (labs export)", flush=True)
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", "export", str(run), "--step", str(step)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabsError(f"labs export {run} --step {step} failed: "
                            + (proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    return out


def _run(run: Path, step: int | None) -> Target:
    hf = export_step(run, step) if step is not None else run / "hf"
    if not hf.is_dir():
        raise LabsError(f"run {run} has no hf/ export (train.export=false, or the run did not finish); serve one "
                        f"of its checkpoints with --step N (`labs export {run}` lists them)")
    if (hf / "config.json").is_file():
        return _folder(hf)
    if (hf / "adapter" / "adapter_config.json").is_file():
        return _adapter(hf / "adapter")
    raise LabsError(f"{hf}: neither a model (config.json) nor a LoRA adapter (adapter/adapter_config.json)")


def resolve_model(target: str, step: int | None = None) -> Target:
    path = Path(target).expanduser()
    if path.is_dir():
        path = path.resolve()
        if (path / "job.yaml").is_file():
            return _run(path, step)
        if step is not None:
            raise LabsError(f"--step {step}: {path} is not a run folder (no job.yaml); --step picks a run's checkpoint")
        if (path / "adapter_config.json").is_file():
            return _adapter(path)
        if (path / "config.json").is_file():
            return _folder(path)
        raise LabsError(f"TARGET {target!r} is a folder with neither job.yaml (a run), config.json (an HF model) "
                        f"nor adapter_config.json (a PEFT adapter)")
    if step is not None:
        raise LabsError(f"--step {step}: TARGET {target!r} is not a run folder")
    if target in PRESETS:
        return _preset(target)
    if not HUB_ID.fullmatch(target):
        raise LabsError(f"TARGET {target!r} is neither a folder, a preset ({', '.join(PRESETS)}) nor a hub id")
    return _hub(target)


def resolve(target: str, step: int | None, loras: list[str], served_name: str | None = None) -> Target:
    """The target and its adapters, every path and name checked."""
    t = resolve_model(target, step)
    if TARGET_ADAPTER in t.adapters:  # TARGET is an adapter: requests naming it get the adapter; the base too
        t.adapters[served_name or target] = t.adapters.pop(TARGET_ADAPTER)
    else:
        t.name = served_name or target
    for spec in loras:
        name, sep, path = spec.partition("=")
        folder = Path(path).expanduser()
        if not sep or not name or not path:
            raise LabsError(f"--lora {spec!r}: write it as NAME=PATH (a PEFT adapter folder)")
        if not (folder / "adapter_config.json").is_file():
            raise LabsError(f"--lora {spec!r}: {path} has no adapter_config.json; pass a PEFT adapter folder "
                            f"(a LoRA run's hf/adapter)")
        if name == t.name or name in t.adapters:
            raise LabsError(f"--lora {spec!r}: the name {name!r} is already served; give each adapter its own name")
        t.adapters[name] = str(folder.resolve())
    return t
