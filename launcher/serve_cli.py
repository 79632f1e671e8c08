"""`labs serve TARGET`: print the serving plan, start the ranks through the training backends, watch them.

    labs serve TARGET [--step N] [--lora NAME=PATH ...] [--tp N | --ds-config C] [--hostfile H]
                      [--backend local|torchrun|ssh] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                      [--dtype auto|fp32|bf16]

TARGET: a run folder (its hf/ export; --step N: that checkpoint, exported first), an HF model folder,
a hub id, a preset (`labs presets`), or a PEFT LoRA adapter folder (served over its base). One rank runs
as a plain process; N tensor-parallel ranks start as training does (deepspeed runner or torchrun, ending
in `launcher.serve.rank` instead of `launcher.worker`) and are supervised the same way: SIGTERM writes the
serve folder's STOP file (rank 0 drains, then tells every rank to quit), a rank that dies ends the server
and is named. This is the `labs` process: it never imports torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.files import load_json
from launcher.common.layout import Layout
from launcher.common.proc import clear_stale_build_locks, free_port, port_free, remove_shm
from launcher.common.run_dir import STOP_FILE
from launcher.config.ds.optim import BF16_FLAGS, cpu_has_bf16
from launcher.config.hostfile import is_local, load_hostfile
from launcher.config.job import Job
from launcher.launch.backends import build_command, check_ssh, check_tools
from launcher.launch.env import runner_env, write_env_file
from launcher.launch.plan import Plan
from launcher.launch.supervise import failure_report, run_ranks
from launcher.serve.plan import LOOPBACK, ServePlan, check_tp
from launcher.serve.target import resolve

REPO = Path(__file__).resolve().parent.parent
RANK_MODULE = "launcher.serve.rank"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="run folder, HF folder, hub id, preset, or PEFT adapter folder")
    p.add_argument("--step", type=int, help="a run's checkpoint of this step (exported to RUN/hf-step<N> first)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT adapter as model NAME (repeatable)")
    p.add_argument("--served-model-name", help="the model id clients send (default: TARGET as given)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks (default 1, or the --ds-config's)")
    p.add_argument("--ds-config", "--ds_config", dest="ds_config",
                   help="DeepSpeed JSON config: its tensor_parallel.autotp_size (or tp_size) is the tp")
    p.add_argument("--hostfile", help="DeepSpeed hostfile; its slots must add up to the tp")
    p.add_argument("--backend", default="auto", choices=("auto", "local", "torchrun", "ssh"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' (default: env LABS_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running requests get after SIGTERM")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="weights, activations and KV cache (default auto: bf16 where the CPU lists avx512_bf16 or "
                        "amx_bf16, as training's `bf16: auto`; else fp32)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: the cores / ranks, as training)")
    p.add_argument("--seed", type=int, default=0, help="random weights of a preset built from config")
    p.add_argument("--out", help="serve folder for logs (default runs/serve/<time> under the working folder)")
    p.add_argument("--master_port", type=int, help="rendezvous port of the ranks (default: a free one)")
    p.add_argument("-v", "--verbose", action="store_true", help="every rank's output on the console")
    return p


def _tp(args: argparse.Namespace) -> int:
    tp = args.tp
    if args.ds_config:
        cfg = load_json(Path(args.ds_config), "DeepSpeed config")
        section = cfg.get("tensor_parallel") or {}
        from_cfg = int(section.get("autotp_size") or section.get("tp_size") or 1)
        if tp is not None and tp != from_cfg:
            raise LabsError(f"--tp {tp} and --ds-config {args.ds_config} (tensor_parallel size {from_cfg}) disagree; "
                            f"give one of them")
        tp = from_cfg
    tp = 1 if tp is None else tp
    if tp < 1:
        raise LabsError(f"--tp {tp}: the tensor-parallel size must be >= 1")
    return tp


def _checks(args: argparse.Namespace, key: str | None) -> None:
    for name, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                        ("--port", args.port, 1), ("--grace", args.grace, 0)):
        if v < lo:
            raise LabsError(f"{name} {v}: it must be >= {lo}")
    if args.host not in LOOPBACK and not key:
        raise LabsError(f"--host {args.host} listens beyond this machine: give an API key (--api-key KEY or the "
                        f"environment variable LABS_API_KEY), or keep --host 127.0.0.1")
    if not port_free(args.port, args.host):
        raise LabsError(f"--port {args.port} is in use on {args.host}: choose another port")


def serve_dtype(requested: str) -> tuple[str, str]:
    """(fp32 | bf16, why) for --dtype: `auto` takes bf16 where this CPU computes it fast (training's rule,
    launcher.config.ds.optim); an explicit bf16 on a CPU without those flags is refused, as training refuses it
    (torch would emulate it, many times slower than fp32)."""
    has = cpu_has_bf16()
    flags = " nor ".join(BF16_FLAGS)
    if requested == "fp32":
        return "fp32", "--dtype fp32"
    if requested == "bf16":
        if has is False:
            raise LabsError(f"--dtype bf16: this CPU lists neither {flags}, so bf16 would be emulated (many times "
                            f"slower than fp32); use --dtype fp32 or --dtype auto")
        return "bf16", "--dtype bf16"
    if has:
        return "bf16", f"--dtype auto: this CPU lists {'/'.join(BF16_FLAGS)}"
    return "fp32", f"--dtype auto: this CPU lists neither {flags}" if has is False else "--dtype auto: no /proc/cpuinfo"


def _launch(args: argparse.Namespace, sp: ServePlan, spec_file: Path) -> Plan:
    """The training backends' command and environment for N serving ranks (a Plan holds what they read)."""
    if args.hostfile:
        hostfile = load_hostfile(args.hostfile)
    else:
        (sp.serve_dir / "hostfile").write_text(f"localhost slots={sp.tp}\n")
        hostfile = load_hostfile(sp.serve_dir / "hostfile")
    if hostfile.world_size != sp.tp:
        raise LabsError(f"hostfile {hostfile.path}: {hostfile.world_size} slots for tp {sp.tp}; serving runs one rank "
                        f"per tensor-parallel shard: make its slots add up to {sp.tp} or leave --hostfile out")
    backend = args.backend
    if backend == "auto":
        backend = "local" if all(is_local(h) for h in hostfile.hosts) else "ssh"
    port = args.master_port or free_port()
    plan = Plan(job=Job(backend=backend, hostfile=str(hostfile.path)), ds_config={}, hostfile=hostfile,
                layout=Layout(world=sp.tp, tp=sp.tp), run_dir=sp.serve_dir, params=None, master_port=port,
                port_given=args.master_port is not None)
    if sp.tp == 1 and backend == "local" and not args.hostfile:
        plan.command = [sys.executable, "-m", RANK_MODULE, "--spec", str(spec_file)]
    else:
        cmd = build_command(plan)
        plan.command = cmd[:cmd.index("launcher.worker")] + [RANK_MODULE, "--spec", str(spec_file)]
    plan.env = runner_env(plan)
    sp.backend, sp.hostfile = backend, args.hostfile
    return plan


def _rank_env(args: argparse.Namespace, plan: Plan, key: str | None, serve_dir: Path) -> dict[str, str]:
    """The ranks' environment, also written as the runner's DS_ENV_FILE (serve_dir/ds_env, owner-only: it
    holds the API key): over ssh that file is all that reaches the ranks, rank 0's API key included."""
    env = plan.env | ({"LABS_API_KEY": key} if key else {})
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.verbose:
        env["LABS_VERBOSE"] = "1"
    return env | {"DS_ENV_FILE": str(write_env_file(serve_dir / "ds_env", env))}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    key = args.api_key or os.environ.get("LABS_API_KEY") or None
    dtype, dtype_why = serve_dtype(args.dtype)
    _checks(args, key)
    tp = _tp(args)
    target = resolve(args.target, args.step, args.lora, args.served_model_name)
    check_tp(target, tp)
    if target.adapters and tp > 1:
        raise LabsError(f"--tp {tp} with LoRA adapters ({', '.join(target.adapters)}): AutoTP does not shard PEFT "
                        f"layers; merge the adapter first (`labs merge RUN`) or serve it on one rank")
    # under the working folder, as training's train.output_dir (REPO is site-packages when pip-installed)
    serve_dir = Path(args.out or Path("runs") / "serve" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    (serve_dir / "logs").mkdir(parents=True, exist_ok=True)
    (serve_dir / STOP_FILE).unlink(missing_ok=True)
    sp = ServePlan(target, tp, args.host, args.port, args.backend, serve_dir, args.max_batch, args.max_queue,
                   args.grace, args.seed, bool(key), dtype=dtype, dtype_why=dtype_why)
    spec_file = serve_dir / "serve.json"
    spec_file.write_text(json.dumps(sp.spec() | {"threads": args.threads}, indent=2))
    plan = _launch(args, sp, spec_file)
    sp.command = plan.command
    print(sp.render(), flush=True)
    if plan.job.backend == "ssh":
        check_tools(plan)
        check_ssh(plan)
    clear_stale_build_locks()
    env = os.environ | _rank_env(args, plan, key, serve_dir)
    out = run_ranks(plan.command, env, cwd=REPO if plan.job.backend == "ssh" else None, run_dir=serve_dir,
                    secrets=[key] if key else [], grace=args.grace + 15, verbose=args.verbose, who="labs serve",
                    stopping=f"the server drains (new requests get 503, running ones {args.grace:g} s to finish), "
                             f"then every rank exits; nothing is saved")
    remove_shm(plan.master_port)  # what a rank that died could not remove itself
    (serve_dir / STOP_FILE).unlink(missing_ok=True)
    if out.code == 0:
        print(f"== server stopped ({out.signalled or 'its ranks ended'}); logs in {serve_dir}/logs", flush=True)
        return 0
    if out.signalled and not out.forced:
        print(f"== server stopped by {out.signalled}; logs in {serve_dir}/logs", flush=True)
        return 0
    print("\n" + failure_report(serve_dir, out.code).replace("run failed", "server failed"), file=sys.stderr)
    return out.code if 0 < out.code < 128 else 1
