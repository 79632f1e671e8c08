"""`labs`: plan and launch runs described by a job, a DeepSpeed config and a hostfile.

    labs plan   jobs/demo.yaml [--ds-config F] [--hostfile F] [--set key=value ...]
    labs launch jobs/demo.yaml [same flags] [--dry_run] [--resume [RUN_DIR]] [--epochs N]
    labs presets
    labs serve  TARGET [--tp N] [--port P] [--lora NAME=PATH ...]   (OpenAI-compatible server, docs/serving.md)
    labs peak   [--dtype fp32 bf16] [--threads 1 2] [--refresh]   (the matmul peak behind MFU)
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.proc import clear_stale_build_locks, free_port, port_free, remove_shm
from launcher.common.run_dir import EXIT_STOPPED, REPO, STOP_FILE, written
from launcher.common.text import mask
from launcher.launch import supervise
from launcher.launch.backends import build_command, check_ssh, check_tools
from launcher.launch.make_plan import make_plan, write_run_files
from launcher.launch.render import render
from launcher.launch.slurm import render_slurm_script
from tasks.presets import PRESETS, describe


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job YAML (see jobs/)")
    p.add_argument("--ds-config", "--ds_config", dest="ds_config", help="DeepSpeed JSON config (overrides the job's)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (overrides the job's)")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a job field (train.epochs=2) or a DeepSpeed key (ds.zero_optimization.stage=3)")
    p.add_argument("--backend", help="auto | local | torchrun | ssh | slurm (overrides the job's)")
    p.add_argument("--include", help="DeepSpeed's host/slot filter: node1@node2:0,1 (cluster.include)")
    p.add_argument("--exclude", help="hosts or slots left out: node3 or node2:1 (cluster.exclude)")
    p.add_argument("--ssh_port", type=int, help="ssh port of the hosts (cluster.ssh_port)")
    p.add_argument("--master_addr", help="rank 0's address, reachable from every host (cluster.master_addr)")
    p.add_argument("--launcher", help="ssh backend: pdsh (default) | openmpi (cluster.launcher)")
    p.add_argument("--num_nodes", type=int, help="DeepSpeed's: run on the first N hosts of the hostfile (cluster.num_nodes)")
    p.add_argument("--num_gpus", "--num_accelerators", dest="num_accelerators", type=int,
                   help="DeepSpeed's: N ranks on each host (cluster.num_accelerators)")
    p.add_argument("--detach", action="store_true", help="slurm backend: return after sbatch, do not wait")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="a handful of samples on CPU, offline")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--data_dir", help="local data folder laid out like shared/data (default $LABS_DATA_DIR)")
    p.add_argument("--resume", nargs="?", const="auto", help="continue the latest (or the given) run from its checkpoint")
    p.add_argument("--master_port", type=int)
    p.add_argument("--memory", metavar="SIZE", help="memory per rank to fit (8GiB, 512MiB; default: this machine's "
                   "available memory / its ranks): says whether the job fits, and what would")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="the whole plan, and every rank's and DeepSpeed's output on the console")


def _plan(args: argparse.Namespace):

    sets = [s for group in args.sets for s in group]
    for flag, key in (("epochs", "train.epochs"), ("max_steps", "train.max_steps"), ("data_dir", "data.data_dir"),
                      ("include", "cluster.include"), ("exclude", "cluster.exclude"),
                      ("ssh_port", "cluster.ssh_port"), ("master_addr", "cluster.master_addr"),
                      ("launcher", "cluster.launcher"), ("num_nodes", "cluster.num_nodes"),
                      ("num_accelerators", "cluster.num_accelerators")):
        if getattr(args, flag) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    if not args.job and args.resume in (None, "auto"):
        raise LabsError("name a job file, for example: labs plan jobs/demo.yaml (or --resume RUN_DIR)")
    plan = make_plan(args.job, ds_config=args.ds_config, hostfile=args.hostfile, sets=sets,
                     dry_run=args.dry_run, resume=args.resume, backend=args.backend,
                     master_port=args.master_port)
    plan.memory_budget = args.memory
    return plan


def cmd_plan(args: argparse.Namespace) -> int:
    print(render(_plan(args), verbose=args.verbose))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:




    if args.verbose:
        os.environ["LABS_VERBOSE"] = "1"  # passed to the ranks (LABS_*): they keep their output on the console
    plan = _plan(args)
    backend = plan.job.backend
    if backend in ("local", "torchrun") and not port_free(plan.master_port):
        if plan.port_given:
            raise LabsError(f"--master_port {plan.master_port} is in use on this machine; choose another port "
                            f"or leave --master_port out (labs then picks a free one)")
        plan.master_port = free_port()
        plan.command = build_command(plan)
    print(render(plan, verbose=args.verbose), flush=True)
    if backend == "ssh":
        print(f"\n== checking ssh to {', '.join(plan.hostfile.hosts)}", flush=True)
        check_tools(plan)
        check_ssh(plan)  # before anything is written: a dead host leaves no empty run folder
    clear_stale_build_locks()
    write_run_files(plan)
    if backend == "slurm":
        env = os.environ | plan.env | {"DS_ENV_FILE": str((plan.config_dir / "ds_env").resolve())}
        return _submit_slurm(plan, env, detach=args.detach)
    secrets = [v for k, v in plan.env.items() if mask(k, v) != v]
    for _attempt in range(3):
        env = os.environ | plan.env | {"DS_ENV_FILE": str((plan.config_dir / "ds_env").resolve())}
        for old in (plan.run_dir / "logs").glob("rank*.status.json"):
            old.unlink()
        print(f"\n== launching {plan.layout.world} ranks ({backend}, rendezvous port {plan.master_port}); "
              f"logs in {plan.run_dir}/logs", flush=True)
        before = supervise.stopped_mark(plan.run_dir)
        # from the repository root: DeepSpeed's multi-node runner cds every host to its own folder
        out = supervise.run_ranks(plan.command, env, cwd=REPO if backend == "ssh" else None, run_dir=plan.run_dir,
                                  secrets=secrets, grace=plan.job.train.stop_grace, verbose=args.verbose)
        remove_shm(plan.master_port)  # what ranks that died could not remove themselves (this host's only)
        if out.code == 0 or out.signalled or plan.port_given or not supervise.port_lost(plan.run_dir):
            break
        plan.master_port = free_port()
        plan.command = build_command(plan)
        print(f"\n== the rendezvous port was taken before rank 0 bound it; again with port {plan.master_port}",
              flush=True)
    (plan.run_dir / STOP_FILE).unlink(missing_ok=True)
    stopped = supervise.stopped_record(plan.run_dir, before)
    if stopped:
        why = f"{out.signalled} to labs launch" if out.signalled else stopped["reason"]
        print(f"\nrun stopped after step {stopped['step']} ({why}); checkpoint saved: {stopped['checkpoint']}\n"
              f"continue it with:\n  labs launch --resume {plan.run_dir}", flush=True)
        return EXIT_STOPPED
    if out.code == 0:
        print(f"\nrun finished: {plan.run_dir} ({', '.join(written(plan.run_dir))})")
        return 0
    if out.signalled:
        print(f"\nrun ended by {out.signalled} before any checkpoint of this launch was saved"
              + ("; the ranks did not stop in time" if out.forced else "") + f"; run folder {plan.run_dir}",
              file=sys.stderr)
        return 128 + int(getattr(signal, out.signalled, signal.SIGTERM))
    print("\n" + supervise.failure_report(plan.run_dir, out.code), file=sys.stderr)
    return out.code if 0 < out.code < 128 else 1


SLURM_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE"}


def _slurm_state(job_id: str, env: dict[str, str]) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN")


def _submit_slurm(plan, env: dict[str, str], detach: bool) -> int:
    """sbatch the rendered script; then (unless detached) poll until the job ends and show its output."""

    script = plan.run_dir / "slurm_job.sh"
    script.write_text(render_slurm_script(plan))
    script.chmod(0o755)
    (plan.run_dir / "logs").mkdir(exist_ok=True)  # Slurm does not create the --output folder
    if not shutil.which("sbatch"):
        raise LabsError(f"sbatch not found: --backend slurm runs on a Slurm login node; the job script is "
                        f"written to {script} (submit it there with `sbatch {script}`)")
    before = supervise.stopped_mark(plan.run_dir)  # before the job can start
    res = subprocess.run(plan.command, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise LabsError(f"sbatch {script} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    job_id = res.stdout.strip().split(";")[0]
    log = plan.run_dir / "logs" / f"slurm-{job_id}.out"
    (plan.run_dir / "slurm_job_id").write_text(job_id + "\n")
    print(f"\n== submitted Slurm job {job_id} ({len(plan.hostfile.hosts)} node(s) x "
          f"{next(iter(plan.hostfile.hosts.values()))} rank(s)); output: {log}", flush=True)
    if detach:
        print(f"   follow it with `squeue -j {job_id}` and `tail -f {log}`; stop it with `scancel {job_id}`")
        return 0
    state, last = "UNKNOWN", ""
    stop = {"signal": None, "deadline": None}

    def on_signal(signum, frame) -> None:  # as for local ranks: the STOP file, then scancel after the grace
        name = signal.Signals(signum).name
        if stop["signal"] is None:
            stop["signal"], stop["deadline"] = name, time.monotonic() + plan.job.train.stop_grace
            (plan.run_dir / STOP_FILE).write_text(f"{name} to labs launch at {time.ctime()}\n")
            print(f"\n== {name}: the ranks of Slurm job {job_id} finish their step, save a checkpoint and exit "
                  f"(up to {plan.job.train.stop_grace} s; {name} again cancels the job now)", file=sys.stderr, flush=True)
        else:
            stop["deadline"] = time.monotonic()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while (state := _slurm_state(job_id, env)) not in SLURM_FINAL:
            if state != last:
                print(f"   job {job_id}: {state}", flush=True)
                last = state
            if stop["deadline"] is not None and time.monotonic() >= stop["deadline"]:
                subprocess.run(["scancel", job_id], env=env, capture_output=True)
                stop["deadline"] = float("inf")
            time.sleep(1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    (plan.run_dir / STOP_FILE).unlink(missing_ok=True)
    if log.is_file():
        print(log.read_text()[-6000:], end="", flush=True)
    if stopped := supervise.stopped_record(plan.run_dir, before):
        print(f"\nSlurm job {job_id} stopped after step {stopped['step']} ({stopped['reason']}); checkpoint "
              f"saved: {stopped['checkpoint']}\ncontinue it with:\n  labs launch --resume {plan.run_dir}", flush=True)
        return EXIT_STOPPED
    if state != "COMPLETED":
        print(f"\nSlurm job {job_id} ended {state}; see {log}\n" + supervise.failure_report(plan.run_dir, 1),
              file=sys.stderr)
        return 1
    print(f"\nrun finished: {plan.run_dir} (Slurm job {job_id} COMPLETED)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        print(describe(name))
    return 0


# Subcommands that own their whole argument list: `labs NAME ...` runs MODULE.main(argv).
DELEGATED = {"rag": "tasks.rag.cli", "compare": "launcher.tools.compare", "peak": "launcher.tools.peak",
             "export": "launcher.tools.export", "merge": "launcher.tools.export:main_merge", "runs": "launcher.tools.runs",
             "serve": "launcher.serve_cli"}
"""`labs NAME ...` -> MODULE.main(argv), or MODULE:FUNCTION(argv)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        modname, _, func = DELEGATED[argv[0]].partition(":")
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError:
            print(f"error: `labs {argv[0]}` is not available in this version", file=sys.stderr)
            sys.exit(2)
        try:
            sys.exit(getattr(module, func or "main")(argv[1:]))
        except LabsError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    parser = argparse.ArgumentParser(prog="labs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("plan", cmd_plan, "check the job and print the plan; starts nothing"),
                               ("launch", cmd_launch, "print the plan and run it")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.set_defaults(fn=fn)
    sub.add_parser("presets", help="list the model presets").set_defaults(fn=cmd_presets)
    for name in DELEGATED:
        sub.add_parser(name, help=f"see `labs {name} --help`", add_help=False)
    args = parser.parse_args(argv)
    try:
        code = args.fn(args)
    except LabsError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
