"""Resume under another layout: a checkpoint consolidated once, then loaded into any engine.

A DeepSpeed checkpoint is stored the way its run held its state: ZeRO-0 keeps the weights and the
optimizer whole in `mp_rank_00_model_states.pt`; ZeRO-1/2 split one flat fp32 vector per parameter
group (master weights, Adam's exp_avg and exp_avg_sq) into dp equal slices, one file per rank;
ZeRO-3 splits every parameter into dp slices of ceil(numel / dp) elements and packs each rank's
slices into its own flat vector. A pipeline keeps each layer's weights in `layer_XX-model_states.pt`
and each stage's optimizer in its own `mp_rank_<stage>` files, under PipelineModule names
(`<layer>.<name>`); AutoTP keeps each tensor-parallel rank's row or column shard of the attention
and MLP matrices in its `mp_rank_<tp rank>` files. None of these loads under another layout.

`consolidate` undoes the split on one process, from the files alone (the source files are
memory-mapped; the result, fp32 weights and two moments, 12 bytes per trained parameter, is held
once in memory), names every tensor as the HF model does (a pipeline's layers through the task's
layer list, tasks/pipeline_layers.py; AutoTP shards joined along the dimension its
`universal_checkpoint_info` records), and writes into the checkpoint's folder, `step<N>/consolidated/`:

    weights.pt      every parameter in fp32 under its model name (frozen ones too: a LoRA base)
    exp_avg.pt      Adam's first moment of every trained parameter, same names and shapes
    exp_avg_sq.pt   the second moment
    engine.pt       the step counts (Adam's, the engine's steps and samples), the LR scheduler's
                    state, the optimizer's learning rates, and the run's client state (its step)
    labs_consolidated.json   written last, atomically: the source, and each file's size and sha256

The conversion is written into `consolidated.tmp<pid>/` and renamed into place once complete; a
folder whose json is missing or whose files do not match it is converted again, and a source that
cannot be read stops the resume with its reason (never a silent start from scratch).

`load_into` puts that state into a freshly built engine of any stage (0-3, offload or not), a
pipeline stage or a tensor-parallel rank: each rank sets the weights (ZeRO-3: gathered, set,
partitioned again; tensor parallel: its slice), the fp32 master copy and the two moments of the
part it owns (DeepSpeed's `safe_set_full_*` for ZeRO-1/2/3 and the bf16 optimizer, the torch
optimizer's state for plain ZeRO-0), Adam's step count, the scheduler and the counters.
The sampler's position follows from the step: with the same global batch every step reads the
same samples at any dp size (launcher/worker.py).

Why not DeepSpeed's `ds_to_universal` + `"checkpoint": {"load_universal": true}`: its loader needs a
ZeRO or bf16 optimizer on the loading side (plain fp32 ZeRO-0, the default here, has no universal
loading of its Adam state), its converter reads ZeRO optimizer files only (not a plain ZeRO-0
checkpoint), and it is a separate multi-process step. Reading the few file layouts above
directly covers every source and target, on one process, in seconds for these models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from launcher import checkpoints
from launcher.common.errors import LabsError

FOLDER = "consolidated"
META = "labs_consolidated.json"
FILES = ("weights.pt", "exp_avg.pt", "exp_avg_sq.pt", "engine.pt")
MOMENTS = ("exp_avg", "exp_avg_sq")
FORMAT = 1


# ---------------------------------------------------------------- is there a good one already

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def problem(tag_dir: Path) -> str | None:
    """Why `tag_dir/consolidated/` cannot be used (None: it is complete and intact)."""
    folder = tag_dir / FOLDER
    if not folder.is_dir():
        return "not converted yet"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return f"{folder / META} is missing or unreadable (a conversion cut short)"
    if meta.get("format") != FORMAT or meta.get("source_step") != checkpoints.step_of(tag_dir):
        return f"{folder / META} describes another conversion"
    for name, want in meta.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != want["bytes"]:
            return f"{f} is missing or has another size than when it was written"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its checksum (corrupted)"
    if sorted(meta.get("files", {})) != sorted(FILES):
        return f"{folder / META} lists other files than a conversion writes"
    return None


def estimate(tag_dir: Path) -> tuple[int, float]:
    """(bytes the conversion writes, seconds it takes), roughly: fp32 weights and two moments are
    12 of the 16 bytes per trained parameter a ZeRO checkpoint holds (ZeRO-0: all of them); about
    150 MB/s to read, merge and write on this kind of machine, plus a few seconds of start-up."""
    source = sum(f.stat().st_size for f in tag_dir.glob("*.pt"))
    zero0 = (tag_dir / "mp_rank_00_model_states.pt").is_file() and not list(tag_dir.glob("*optim_states.pt"))
    out = source if zero0 else source * 3 // 4
    return out, 3.0 + (source + out) / 150e6


def check_whole(state: dict, where: str) -> dict:
    """A consolidated state dict holds every tensor whole. Under ZeRO-3 a parameter read off the live
    model is an empty placeholder (its data lives in the ranks' partitions): PEFT's save_pretrained
    there writes an empty adapter without a word. Refuse such a state instead of writing it."""
    empty = [k for k, v in state.items() if hasattr(v, "numel") and v.numel() == 0]
    if empty:
        raise RuntimeError(f"{where}: {len(empty)} tensor(s) are empty ({', '.join(empty[:4])}...): ZeRO-3 "
                           f"partitions read off the live model instead of the consolidated checkpoint; "
                           f"nothing written")
    return state


# ---------------------------------------------------------------- reading a checkpoint of any ZeRO stage

def _load(path: Path) -> dict:
    import torch
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file: name it
        raise LabsError(f"{path}: cannot be read ({type(e).__name__}: {e}); this checkpoint cannot be converted: "
                        f"resume from an older complete one (remove this step's folder) or start a new run") from e


def _numel(shape) -> int:
    return int(math.prod(shape))


def _merge_zero12(shapes: list[dict], paddings, per_rank: list[list]) -> dict:
    """ZeRO-1/2: group g's flat vector is the ranks' slices end to end; parameters follow each other
    in it (plus any alignment padding DeepSpeed records)."""
    import torch
    out = {}
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([r[g].reshape(-1) for r in per_rank])
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            n = _numel(shape)
            out[name] = flat.narrow(0, offset, n).view(tuple(shape)).clone()
            offset += n + (paddings[g][i] if paddings is not None else 0)
        if offset > flat.numel():
            raise LabsError(f"ZeRO-1/2 checkpoint: group {g} needs {offset} elements, its files hold {flat.numel()}")
    return out


def _merge_zero3(shapes: list[dict], per_rank: list[list]) -> dict:
    """ZeRO-3: each rank's vector holds, parameter after parameter, its ceil(numel / dp) slice."""
    import torch
    dp = len(per_rank)
    flats = [torch.cat([t.reshape(-1) for t in r]) for r in per_rank]
    out, offset = {}, 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            n = _numel(shape)
            part = math.ceil(n / dp)
            out[name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:n].view(tuple(shape)).clone()
            offset += part
    if offset != flats[0].numel():
        raise LabsError(f"ZeRO-3 checkpoint: its parameters need {offset} elements per rank, its files hold "
                        f"{flats[0].numel()}")
    return out


def _step_value(v) -> int:
    return int(v.item()) if hasattr(v, "item") else int(v)


def pipeline_names(model) -> dict[str, str]:
    """Pipeline parameter name (`<layer index>.<name in the layer>`, as a PipelineModule and its
    `layer_XX-model_states.pt` files have them) -> the HF model's name, from the task's layer list
    (tasks/pipeline_layers.py), whose layers wrap the model's own submodules."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    from launcher.parallel.layers.pipeline import pipeline_layers
    ids: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        ids.setdefault(id(p), n)
    out = {}
    for i, layer in enumerate(pipeline_layers(model, "model")):
        if isinstance(layer, TiedLayerSpec):
            raise LabsError("a pipeline with tied layers (GPT-2's embedding and head) cannot be converted yet")
        if isinstance(layer, LayerSpec):
            layer = layer.build()
        for n, p in layer.named_parameters():
            out[f"{i}.{n}"] = ids[id(p)]
    return out


def _read_optimizer(tag_dir: Path, manifest: checkpoints.Manifest, mp: int) -> tuple[dict, dict, list, list, dict | None]:
    """One model-parallel rank's files (mp: the pipeline stage; 0 without a pipeline): (its model-states
    dict, moments, Adam step counts, learning rates, fp32 master weights merged from ZeRO partitions or None)."""
    stage = manifest.zero_stage
    model_file = tag_dir / (f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if stage == 3
                            else f"mp_rank_{mp:02d}_model_states.pt")
    sd = _load(model_file)
    moments: dict[str, dict] = {k: {} for k in MOMENTS}
    if stage == 0:
        if not isinstance(sd.get("optimizer"), dict) or "state" not in sd["optimizer"]:
            raise LabsError(f"{model_file}: no optimizer state of a plain (ZeRO-0 fp32) optimizer in it; "
                            f"{manifest.precision} ZeRO-0 checkpoints cannot be converted yet")
        names = list(sd.get("labs_params") or [])
        opt = sd["optimizer"]
        order = [i for g in opt["param_groups"] for i in g["params"]]
        if len(names) != len(order):
            raise LabsError(f"{model_file}: the checkpoint does not record which parameter each of its "
                            f"{len(order)} optimizer states belongs to (saved before labs recorded it)")
        steps = []
        for idx, name in zip(order, names, strict=True):
            st = opt["state"].get(idx)
            if st:
                for k in MOMENTS:
                    moments[k][name] = st[k].float().clone()
                steps.append(_step_value(st["step"]))
        return sd, moments, steps, [g["lr"] for g in opt["param_groups"]], None
    files = sorted(tag_dir.glob(f"*pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"),  # (bf16_)zero_pp_rank_<dp>_...
                   key=lambda p: int(re.search(r"pp_rank_(\d+)_mp_rank", p.name).group(1)))
    if len(files) != manifest.dp:
        raise LabsError(f"{tag_dir}: {len(files)} optimizer-state files for a data-parallel size of {manifest.dp}")
    opts = [_load(f)["optimizer_state_dict"] for f in files]
    inner = "base_optimizer_state" if stage < 3 else "optimizer_state_dict"
    shapes = sd["param_shapes"]
    per_rank: dict[str, list] = {}
    for key, pick in (("fp32", lambda o: o["single_partition_of_fp32_groups" if stage < 3 else "fp32_flat_groups"]),
                      *((k, lambda o, k=k: [o[inner]["state"][g][k] for g in sorted(o[inner]["state"])])
                        for k in MOMENTS)):
        per_rank[key] = [pick(o) for o in opts]
    merge = ((lambda r: _merge_zero12(shapes, opts[0].get("param_alignment_paddings"), r)) if stage < 3
             else (lambda r: _merge_zero3(shapes, r)))
    master = merge(per_rank.pop("fp32"))
    for k in MOMENTS:
        moments[k] = merge(per_rank[k])
    steps = [_step_value(o[inner]["state"][g]["step"]) for o in opts for g in o[inner]["state"]]
    return sd, moments, steps, [g["lr"] for g in opts[0][inner]["param_groups"]], master


def _pipeline_weights(tag_dir: Path, rename: dict[str, str]) -> dict:
    """The HF model's weights from a pipeline checkpoint's `layer_XX-model_states.pt` files, one at a time."""
    weights = {}
    for f in sorted(tag_dir.glob("layer_*-model_states.pt")):
        i = int(f.name[6:8])
        for k, v in _load(f).items():
            if f"{i}.{k}" not in rename:
                raise LabsError(f"{f}: holds {k}, which layer {i} of this model's pipeline does not have: "
                                f"the checkpoint was saved from another model")
            weights[rename[f"{i}.{k}"]] = v.float().clone()
    return weights


def _tp_split_dim(name: str, shard_shape, info: dict, tp: int) -> int | None:
    """The dimension AutoTP split parameter `name` along (None: replicated on every tensor-parallel
    rank), from the `universal_checkpoint_info` DeepSpeed stores with an AutoTP checkpoint:
    row-parallel layers (o_proj, down_proj) split their input columns (dim 1), a vocabulary-parallel
    head its rows, replicated ones (embeddings, norms) none; every other AutoTP layer is
    column-parallel (q/k/v, gate/up: their output rows, dim 0)."""
    def matches(key: str) -> bool:
        return any(re.match(pat, name) for pat in info.get(key) or [])
    for pat, entry in ((info.get("affine_map") or {}).get("params") or {}).items():
        if re.match(pat, name) and "logical_shape" in entry:
            diff = [d for d, (a, b) in enumerate(zip(shard_shape, entry["logical_shape"], strict=True)) if a != b]
            return diff[0] if diff else None
    if matches("tp_replicated_parameter_patterns") or len(shard_shape) < 2:
        return None
    if matches("parameter_with_row_parallelism_patterns"):
        return 1
    if matches("vocabulary_parameter_patterns"):
        return None if shard_shape[0] == info.get("original_vocab_size") else 0
    return 0


def _join_tp(parts: list[dict], info: dict, tp: int, where: Path) -> dict:
    import torch
    out = {}
    for name, first in parts[0].items():
        dim = _tp_split_dim(name, list(first.shape), info, tp)
        out[name] = first if dim is None else torch.cat([p[name] for p in parts], dim)
    return out


def tensor_parallel_weights(tag_dir: Path, manifest: checkpoints.Manifest) -> dict:
    """The HF model's weights from an AutoTP checkpoint (ZeRO 0-2): each tensor-parallel rank's module
    state from its `mp_rank_XX_model_states.pt`, joined; the optimizer files are not read."""
    if manifest.zero_stage == 3:
        raise LabsError(f"{tag_dir}: a tensor-parallel ZeRO-3 checkpoint cannot be exported yet")
    parts, info = [], {}
    for t in range(manifest.tp):
        sd = _load(tag_dir / f"mp_rank_{t:02d}_model_states.pt")
        info = info or sd.get("universal_checkpoint_info") or {}
        parts.append({k: v.float() for k, v in sd["module"].items()})
        del sd
    return _join_tp(parts, info, manifest.tp, tag_dir)


def _read_tensor_parallel(tag_dir: Path, manifest: checkpoints.Manifest):
    """Each tensor-parallel rank's files read as one model-parallel rank, then every split parameter
    (weights, both moments) joined along its split dimension."""
    per_tp = [_read_optimizer(tag_dir, manifest, t) for t in range(manifest.tp)]
    sd = per_tp[0][0]
    info = sd.get("universal_checkpoint_info") or {}
    if info.get("parameter_with_sub_params"):
        raise LabsError(f"{tag_dir}: AutoTP split fused parameters ({info['parameter_with_sub_params'][:2]}...), "
                        f"which cannot be converted yet")
    if manifest.zero_stage == 3:
        raise LabsError(f"{tag_dir}: a tensor-parallel ZeRO-3 checkpoint cannot be converted yet")
    weights = _join_tp([{k: v.float() for k, v in x[0]["module"].items()} for x in per_tp], info, manifest.tp, tag_dir)
    moments = {k: _join_tp([x[1][k] for x in per_tp], info, manifest.tp, tag_dir) for k in MOMENTS}
    master = _join_tp([x[4] for x in per_tp], info, manifest.tp, tag_dir) if per_tp[0][4] is not None else None
    steps = [st for x in per_tp for st in x[2]]
    return sd, weights, moments, steps, per_tp[0][3], master


def read_source(tag_dir: Path, manifest: checkpoints.Manifest, model=None) -> tuple[dict, dict, dict]:
    """(weights, moments {"exp_avg": {...}, "exp_avg_sq": {...}}, engine state) of a checkpoint, under
    the HF model's parameter names. A pipeline checkpoint needs the (task's) model to name its layers."""
    import torch
    stage = manifest.zero_stage
    if manifest.tp > 1 and manifest.pp > 1:
        raise LabsError(f"{tag_dir}: a pipeline x tensor-parallel checkpoint cannot be converted yet")
    if manifest.tp > 1:
        sd, weights, moments, steps, lrs, master = _read_tensor_parallel(tag_dir, manifest)
    elif manifest.pp > 1:
        if model is None:
            raise LabsError(f"{tag_dir}: a pipeline checkpoint needs the model to name its layers")
        rename = pipeline_names(model)
        weights = _pipeline_weights(tag_dir, rename)
        moments: dict[str, dict] = {k: {} for k in MOMENTS}
        steps, master = [], {}
        for mp in range(manifest.pp):
            sd_mp, mom, st, lrs_mp, mast = _read_optimizer(tag_dir, manifest, mp)
            if mp == 0:
                sd, lrs = sd_mp, lrs_mp
            for k in MOMENTS:
                moments[k].update({rename[n]: t for n, t in mom[k].items()})
            master.update({rename[n]: t for n, t in (mast or {}).items()})
            steps += st
    else:
        sd, moments, steps, lrs, master = _read_optimizer(tag_dir, manifest, 0)
        if stage == 0:
            weights = {k: v.float().clone() for k, v in sd["module"].items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            try:
                weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            except Exception as e:
                raise LabsError(f"{tag_dir}: DeepSpeed's zero_to_fp32 cannot read it ({type(e).__name__}: {e})") from e
            weights = {k: v.float().clone() for k, v in weights.items()}
    for name, t in (master or {}).items():  # the merge walks the layout DeepSpeed wrote: a self-check
        if name not in weights or not torch.equal(weights[name], t):
            raise LabsError(f"{tag_dir}: merging the ZeRO-{stage} partitions of {name} disagrees with the "
                            f"checkpoint's weights; refusing to convert")
    if len(set(steps)) > 1:
        raise LabsError(f"{tag_dir}: its optimizer states disagree on Adam's step count ({sorted(set(steps))})")
    engine = {"adam_step": steps[0] if steps else 0, "lrs": lrs, "lr_scheduler": sd.get("lr_scheduler"),
              "global_steps": sd.get("global_steps", 0), "global_samples": sd.get("global_samples", 0),
              "skipped_steps": sd.get("skipped_steps", 0), "labs": sd.get("labs", {}),
              "trained": sorted(moments["exp_avg"])}
    return weights, moments, engine


def consolidate(tag_dir: Path, manifest: checkpoints.Manifest, model=None) -> Path:
    """Write `tag_dir/consolidated/` (see the module's docstring); returns it."""
    import torch
    t0 = time.perf_counter()
    weights, moments, engine = read_source(tag_dir, manifest, model)
    final = tag_dir / FOLDER
    tmp = tag_dir / f"{FOLDER}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, obj in (("weights.pt", weights), ("exp_avg.pt", moments["exp_avg"]),
                      ("exp_avg_sq.pt", moments["exp_avg_sq"]), ("engine.pt", engine)):
        torch.save(obj, tmp / name)
    meta = {"format": FORMAT, "source_step": manifest.step, "source_layout": manifest.layout_key(),
            "source_offload": manifest.offload, "parameters": len(weights), "trained": len(moments["exp_avg"]),
            "elements": sum(v.numel() for v in weights.values()), "seconds": round(time.perf_counter() - t0, 2),
            "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in FILES}}
    checkpoints._atomic_write(tmp / META, json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def ensure(tag_dir: Path, manifest: checkpoints.Manifest, say=print, model=None) -> Path:
    """The checkpoint's consolidated folder: reused when intact, else (re)converted. One process."""
    for left in tag_dir.glob(f"{FOLDER}.tmp*"):
        shutil.rmtree(left, ignore_errors=True)
    why = problem(tag_dir)
    if why is None:
        say(f"resume: {tag_dir / FOLDER} is already converted and intact: reusing it")
        return tag_dir / FOLDER
    size, secs = estimate(tag_dir)
    say(f"resume: converting {tag_dir.name} ({why}) for the new layout: about {size / 1e6:.0f} MB, ~{secs:.0f} s")
    t0 = time.perf_counter()
    folder = consolidate(tag_dir, manifest, model)
    say(f"resume: converted into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


# ---------------------------------------------------------------- loading it into any engine

def _torch_optimizer(opt):
    import torch
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _prime_optimizer_state(engine, adam_step: int) -> None:
    """Torch's Adam creates its state at its first step; create it now (zeros, this step count) so
    that the moments can be written into it, and let DeepSpeed link its per-parameter views."""
    import torch
    opt = _torch_optimizer(engine.optimizer)
    plain_torch = type(opt).__module__.startswith("torch.optim")
    # the tensors the optimizer steps: ZeRO's fp32 flat partitions (ZeRO-3 hands them to the torch
    # optimizer only during its step), the bf16 optimizer's, or (plain ZeRO-0) the parameters
    flats = None
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if (flats := getattr(engine.optimizer, attr, None)) is not None:
            break
    stepped = list(flats) if flats is not None else [p for g in opt.param_groups for p in g["params"]]
    for p in stepped:
        if p is not None:
            st = opt.state[p]
            for k in MOMENTS:
                if k not in st:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] = torch.tensor(float(adam_step)) if plain_torch else adam_step
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_into(strategy, folder: Path) -> dict[str, Any]:
    """Set a freshly built data-parallel engine (ZeRO 0-3, offload or not) to the consolidated
    state; returns the run's client state. Collective (every rank of the run calls it)."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    engine = strategy.engine
    weights = torch.load(folder / "weights.pt", map_location="cpu", mmap=True, weights_only=True)
    moments = {k: torch.load(folder / f"{k}.pt", map_location="cpu", mmap=True, weights_only=True) for k in MOMENTS}
    state = torch.load(folder / "engine.pt", map_location="cpu", weights_only=False)
    named = list(engine.module.named_parameters())
    hf_of = getattr(strategy, "names", None)  # a pipeline stage: id(param) -> its names in the HF model
    if hf_of is not None:
        named = [(hf_of[id(p)][0], p) for _, p in named]
    missing = [n for n, _ in named if n not in weights]
    if missing:
        raise LabsError(f"{folder}: the checkpoint has no weights for {len(missing)} parameter(s) of this model "
                        f"({', '.join(missing[:4])}...): it was saved from another model")
    trained_now = sorted(n for n, p in named if p.requires_grad)
    if not set(trained_now) <= set(state["trained"]) or (hf_of is None and trained_now != state["trained"]):
        raise LabsError(f"{folder}: the checkpoint trained {len(state['trained'])} parameters, this run trains "
                        f"{len(trained_now)}: another model or LoRA set-up")
    _prime_optimizer_state(engine, state["adam_step"])
    opt = _torch_optimizer(engine.optimizer)
    zero3 = engine.zero_optimization_stage() == 3
    tp = strategy.layout.tp
    tp_rank = torch.distributed.get_rank() % tp if tp > 1 else 0

    def mine(name: str, p, t):
        """This rank's part of full tensor t: under tensor parallelism the slice AutoTP gave it."""
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tp == 1 or tuple(t.shape) == shape:
            return t
        diff = [d for d, (a, b) in enumerate(zip(shape, t.shape, strict=True)) if a != b]
        if len(diff) != 1 or shape[diff[0]] * tp != t.shape[diff[0]]:
            raise LabsError(f"{folder}: {name} is {tuple(t.shape)} in the checkpoint and {shape} on this "
                            f"tensor-parallel rank: not an even split over {tp} ranks")
        d = diff[0]
        return t.narrow(d, tp_rank * shape[d], shape[d]).contiguous()

    with torch.no_grad():
        for name, p in named:
            full = mine(name, p, weights[name])
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(full.view(p.shape).to(p.dtype))
            else:
                p.data.copy_(full.to(p.dtype))
            if not p.requires_grad:
                continue
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO-1/2/3, bf16 optimizer
                safe_set_full_fp32_param(p, full)
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, mine(name, p, moments[k][name]), k)
            else:  # plain torch optimizer (ZeRO-0 fp32): p is its own master copy
                for k in MOMENTS:
                    opt.state[p][k].copy_(mine(name, p, moments[k][name]).view(p.shape))
    for group, lr in zip(opt.param_groups, state["lrs"], strict=False):
        group["lr"] = lr
    if engine.lr_scheduler is not None and state["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    return state["labs"]
