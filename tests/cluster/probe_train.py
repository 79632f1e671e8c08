"""Tiny multi-rank training probe for the cluster tests.

Runs a few ZeRO-2 steps on gloo with a 2-layer MLP and prints, from every rank:
    rank R host H loss L
then, from rank 0 only, after checking that all ranks hold identical parameters:
    PROBE_OK world=W
Works under any launcher that sets the torch.distributed env (deepspeed runner, torchrun, srun).
"""

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

STEPS = int(os.environ.get("PROBE_STEPS", "3"))


def say(line: str) -> None:
    """One write per line, so lines of ranks sharing a pipe do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    host = socket.gethostname()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10_000,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own shard
    for _ in range(STEPS):
        x = torch.randn(4, 8, generator=data)
        y = torch.randn(4, 2, generator=data)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    say(f"rank {rank} host {host} loss {loss.item():.4f}")

    total = sum(p.detach().double().sum().item() for p in engine.module.parameters())
    checksum = torch.tensor([total], dtype=torch.float64)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, checksum)
    assert all(abs(s.item() - sums[0].item()) < 1e-6 for s in sums), f"parameters diverged: {sums}"
    dist.barrier()
    if rank == 0:
        say(f"PROBE_OK world={world}")
    dist.barrier()
    for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ['MASTER_PORT']}_{rank}"):
        seg.unlink(missing_ok=True)  # DeepSpeed's CPU comm op never removes its 66 MiB workspace
    sys.stderr.flush()
    os._exit(0)  # no gloo teardown: it races with peers on other hosts that already left (see launcher.worker._leave)


if __name__ == "__main__":
    main()
