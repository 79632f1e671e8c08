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
layer list, launcher/parallel/layers/pipeline.py; AutoTP shards joined along the dimension its
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
same samples at any dp size (launcher/rank/train.py).

Why not DeepSpeed's `ds_to_universal` + `"checkpoint": {"load_universal": true}`: its loader needs a
ZeRO or bf16 optimizer on the loading side (plain fp32 ZeRO-0, the default here, has no universal
loading of its Adam state), its converter reads ZeRO optimizer files only (not a plain ZeRO-0
checkpoint), and it is a separate multi-process step. Reading the few file layouts above
directly covers every source and target, on one process, in seconds for these models.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

from launcher.checkpoint.store import (
    FILES,
    FOLDER,
    FORMAT,
    META,
    MOMENTS,
    Manifest,
    _atomic_write,
    estimate,
    problem,
)
from launcher.common.errors import LabsError
from launcher.common.files import sha256_file


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


def _load(path: Path) -> dict:
    # keeps torch and DeepSpeed out of the labs process
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
    # keeps torch and DeepSpeed out of the labs process
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
    # keeps torch and DeepSpeed out of the labs process
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


def _read_optimizer(tag_dir: Path, manifest: Manifest, mp: int) -> tuple[dict, dict, list, list, dict | None]:
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


def pipeline_weights(tag_dir: Path, rename: dict[str, str]) -> dict:
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
    # keeps torch and DeepSpeed out of the labs process
    import torch
    out = {}
    for name, first in parts[0].items():
        dim = _tp_split_dim(name, list(first.shape), info, tp)
        out[name] = first if dim is None else torch.cat([p[name] for p in parts], dim)
    return out


def tensor_parallel_weights(tag_dir: Path, manifest: Manifest) -> dict:
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


def _read_tensor_parallel(tag_dir: Path, manifest: Manifest):
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


def read_source(tag_dir: Path, manifest: Manifest, rename: dict[str, str] | None = None) -> tuple[dict, dict, dict]:
    """(weights, moments {"exp_avg": {...}, "exp_avg_sq": {...}}, engine state) of a checkpoint, under
    the HF model's parameter names. A pipeline checkpoint needs the (task's) model to name its layers."""
    # keeps torch and DeepSpeed out of the labs process
    import torch
    stage = manifest.zero_stage
    if manifest.tp > 1 and manifest.pp > 1:
        raise LabsError(f"{tag_dir}: a pipeline x tensor-parallel checkpoint cannot be converted yet")
    if manifest.tp > 1:
        sd, weights, moments, steps, lrs, master = _read_tensor_parallel(tag_dir, manifest)
    elif manifest.pp > 1:
        if rename is None:
            raise LabsError(f"{tag_dir}: a pipeline checkpoint needs its layers' HF names (pipeline_names(model))")
        weights = pipeline_weights(tag_dir, rename)
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
            # keeps torch and DeepSpeed out of the labs process
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


def consolidate(tag_dir: Path, manifest: Manifest, rename: dict[str, str] | None = None) -> Path:
    """Write `tag_dir/consolidated/` (see the module's docstring); returns it."""
    # keeps torch and DeepSpeed out of the labs process
    import torch
    t0 = time.perf_counter()
    weights, moments, engine = read_source(tag_dir, manifest, rename)
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
            "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in FILES}}
    _atomic_write(tmp / META, json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def ensure(tag_dir: Path, manifest: Manifest, say=print, rename: dict[str, str] | None = None) -> Path:
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
    folder = consolidate(tag_dir, manifest, rename)
    say(f"resume: converted into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder
