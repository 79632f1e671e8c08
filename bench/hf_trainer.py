"""The HF Trainer baseline: the same job's model and data (the project's task code, same seed) trained
by `transformers.Trainer` with a DeepSpeed config, on CPU (`TrainingArguments(use_cpu=True,
deepspeed=...)`), under torchrun.

    torchrun --nproc_per_node 2 bench/hf_trainer.py --job jobs/compare.yaml --ds_config ds_configs/zero2.json \\
        --steps 10 --micro 2 --accum 2 --threads 1 --out_json r.json --set data.block_size=64

The DeepSpeed config is the project's own (its batch triad set from the flags; for bf16 its *_bf16.json
twin); the Trainer's arguments are set to the values `labs launch` resolves for the same job
(bench/torch_loop.py `labs_hparams`: lr, betas, eps, weight decay, warm-up steps, clipping; the Trainer
fills the config's "auto" from them and refuses a config that disagrees with them). A callback times each optimizer step on rank 0 (from `on_step_begin`, after the step's
micro-batches are fetched, to `on_step_end`, after the optimizer step), as the labs worker times its
steps. Ranks are pinned one per core, as DeepSpeed's --bind_cores_to_rank does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.torch_loop import build_parts, labs_hparams, parse, pin  # noqa: E402


def main() -> int:
    a = parse()
    pin(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    torch.set_num_threads(a.threads or max(len(os.sched_getaffinity(0)), 1))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    bf16 = a.precision == "bf16"
    ds_path = a.ds_config or "ds_configs/zero2.json"
    if bf16 and not ds_path.endswith("_bf16.json"):
        ds_path = ds_path.replace(".json", "_bf16.json")
    cfg = json.loads(Path(ds_path).read_text())
    cfg.update(train_batch_size=a.micro * a.accum * world, train_micro_batch_size_per_gpu=a.micro,
               gradient_accumulation_steps=a.accum)
    job, parts = build_parts(a.job, a.sets)
    hp = labs_hparams(a.job, a.sets, world)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=a.device == "cpu", deepspeed=cfg, bf16=bf16, per_device_train_batch_size=a.micro,
            gradient_accumulation_steps=a.accum, max_steps=a.steps, learning_rate=hp["lr"],
            adam_beta1=hp["betas"][0], adam_beta2=hp["betas"][1], adam_epsilon=hp["eps"],
            weight_decay=hp["weight_decay"], warmup_steps=hp["warmup"], max_grad_norm=hp["clip"],
            logging_steps=1, save_strategy="no", report_to=[], seed=job.train.seed, data_seed=job.train.seed,
            dataloader_drop_last=True, disable_tqdm=True, ddp_backend="gloo" if a.device == "cpu" else "nccl")
        trainer = Trainer(model=parts.model, args=args, train_dataset=parts.train_data,
                          data_collator=parts.collate, callbacks=[timer])
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    if rank == 0 and a.out_json:
        from launcher.rank.mfu import model_flops
        seq = int(parts.train_data[0]["input_ids"].shape[-1])
        Path(a.out_json).write_text(json.dumps({
            "step_times": timer.times, "losses": losses, "tokens_per_step": a.micro * a.accum * world * seq,
            "flops_per_token": model_flops(parts.model, seq).total, "threads": torch.get_num_threads(),
            "world": world, "ds_config": ds_path}, indent=1) + "\n")
    print(f"rank {rank}: {len(timer.times)} steps, loss {losses[-1] if losses else float('nan'):.4f}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
