"""`labs export RUN [--step N]` and `labs merge RUN [--step N]`: a run's checkpoint as Hugging Face weights,
on one process, after the fact.

The run's own job.yaml says which task and model; the task builds the model (no data beyond a sample
row) and writes it exactly as the run's end does (`task.export`: safetensors, the PEFT adapter for
LoRA runs, the merged model with `merge`). Weights come from the checkpoint: ZeRO-0 keeps them whole
in `mp_rank_00_model_states.pt`; ZeRO-1/2/3 partitions are consolidated by DeepSpeed's zero_to_fp32;
a pipeline's `layer_XX-model_states.pt` files are read one at a time and named through the task's
pipeline layer list; AutoTP's row/column shards are joined along the dimension DeepSpeed's
`universal_checkpoint_info` records (launcher/checkpoint/convert.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from launcher.checkpoint.convert import check_whole, pipeline_weights, tensor_parallel_weights
from launcher.checkpoint.store import Manifest, complete
from launcher.common.errors import LabsError
from launcher.common.proc import single_process_env
from launcher.config.job import load_job
from tasks.options import check_options
from tasks.registry import get_task


def pick(run_dir: Path, step: int | None) -> tuple[Manifest, Path]:
    ckpt_dir = run_dir / "checkpoints"
    found = complete(ckpt_dir)
    if not found:
        raise LabsError(f"{run_dir}: no complete checkpoint in {ckpt_dir} (dry runs keep none unless "
                        f"train.checkpoint=true; train.save_every = N saves every N steps)")
    if step is None:
        return found[-1]
    for m, p in found:
        if m.step == step:
            return m, p
    raise LabsError(f"--step {step}: {ckpt_dir} has complete checkpoints at steps "
                    f"{', '.join(str(m.step) for m, _ in found)}")


def consolidated(manifest: Manifest, tag_dir: Path, model=None) -> dict:
    # keeps torch and DeepSpeed out of the labs process
    import torch

    # keeps torch and DeepSpeed out of the labs process
    from launcher.parallel.layers.pipeline import pipeline_names
    if manifest.tp > 1:  # AutoTP shards joined along their split dimension
        return check_whole(tensor_parallel_weights(tag_dir, manifest), str(tag_dir))
    if manifest.pp > 1:  # one layer file at a time, named through the task's pipeline layer list
        return check_whole(pipeline_weights(tag_dir, pipeline_names(model)), str(tag_dir))
    if manifest.zero_stage == 0:
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return check_whole({k: v.float() for k, v in sd.items()}, str(tag_dir))
    # keeps torch and DeepSpeed out of the labs process
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return check_whole(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name), str(tag_dir))


def export_run(run_dir: str | Path, step: int | None = None, out: str | Path | None = None,
               merge: bool = False) -> Path:



    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / "job.yaml").is_file():
        raise LabsError(f"{run_dir}: not a run folder (no job.yaml); pass a folder under runs/<job>/")
    manifest, tag_dir = pick(run_dir, step)
    job = load_job(run_dir / "job.yaml")
    options = check_options(job, None)
    if merge:
        if not any(f.name == "merge" for f in dataclasses.fields(options)):
            raise LabsError(f"{run_dir}: task {job.task!r} trains no LoRA adapter: nothing to merge "
                            f"(`labs export {run_dir}` writes its weights)")
        options.merge = True
    single_process_env()
    job.data.max_train_samples, job.data.max_eval_samples = 1, 1  # the model is what is wanted
    task = get_task(job.task)
    parts = task.build(job, options, dry_run=False)
    state = consolidated(manifest, tag_dir, parts.model)
    target = Path(out) if out else run_dir / f"hf-{'merged-' if merge else ''}step{manifest.step}"
    task.export(parts, state, target)
    return target


def main(argv: list[str] | None = None, merge: bool = False) -> int:
    name = "merge" if merge else "export"
    p = argparse.ArgumentParser(prog=f"labs {name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder (runs/<job>/<time>)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the newest complete one)")
    p.add_argument("--out", help="where to write (default: RUN/hf-[merged-]step<N>)")
    args = p.parse_args(argv)
    target = export_run(args.run, args.step, args.out, merge=merge)
    what = "merged model (base + adapter)" if merge else "Hugging Face weights"
    print(f"{what} written to {target}")
    return 0


def main_merge(argv: list[str] | None = None) -> int:
    return main(argv, merge=True)
