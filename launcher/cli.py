"""`labs`: plan and launch runs described by a job, a DeepSpeed config and a hostfile.

    labs plan   jobs/demo.yaml [--ds-config F] [--hostfile F] [--set key=value ...]
    labs launch jobs/demo.yaml [same flags] [--dry_run] [--resume [RUN_DIR]] [--epochs N]
    labs presets
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from launcher.errors import LabsError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job YAML (see jobs/)")
    p.add_argument("--ds-config", "--ds_config", dest="ds_config", help="DeepSpeed JSON config (overrides the job's)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (overrides the job's)")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a job field (train.epochs=2) or a DeepSpeed key (ds.zero_optimization.stage=3)")
    p.add_argument("--backend", help="local | torchrun (overrides the job's)")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="a handful of samples on CPU, offline")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--data_dir", help="local data folder laid out like shared/data (default $LABS_DATA_DIR)")
    p.add_argument("--resume", nargs="?", const="auto", help="continue the latest (or the given) run from its checkpoint")
    p.add_argument("--master_port", type=int)


def _plan(args: argparse.Namespace):
    from launcher.plan import make_plan

    sets = [s for group in args.sets for s in group]
    for flag, key in (("epochs", "train.epochs"), ("max_steps", "train.max_steps"), ("data_dir", "data.data_dir")):
        if getattr(args, flag) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    if not args.job:
        raise LabsError("name a job file, for example: labs plan jobs/demo.yaml")
    return make_plan(args.job, ds_config=args.ds_config, hostfile=args.hostfile, sets=sets,
                     dry_run=args.dry_run, resume=args.resume, backend=args.backend,
                     master_port=args.master_port)


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.plan import render
    print(render(_plan(args)))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from launcher.plan import render, write_run_files

    plan = _plan(args)
    print(render(plan), flush=True)
    write_run_files(plan)
    env = os.environ | plan.env | {"DS_ENV_FILE": str((plan.run_dir / "ds_env").resolve())}
    print(f"\n== launching {plan.layout.world} ranks ({plan.job.backend}); logs in {plan.run_dir}/logs", flush=True)
    try:
        code = subprocess.call(plan.command, env=env)
    except KeyboardInterrupt:
        code = 130
    if code == 0:
        print(f"\nrun finished: {plan.run_dir} (summary.json, metrics.jsonl, hf/, checkpoints/)")
    else:
        print(f"\nrun failed with exit code {code}; see {plan.run_dir}/logs", file=sys.stderr)
    return code


def cmd_presets(args: argparse.Namespace) -> int:
    from tasks.presets import PRESETS, VOCAB, count_params
    for name, cfg in PRESETS.items():
        total, _ = count_params(cfg, VOCAB[cfg["tokenizer"]])
        print(f"{name:<12} {cfg['arch']:<6} {total / 1e6:7.1f}M params  tokenizer {cfg['tokenizer']}")
    return 0


# Subcommands that own their whole argument list: `labs NAME ...` runs MODULE.main(argv).
DELEGATED = {"rag": "tasks.rag", "compare": "launcher.compare"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib
        try:
            module = importlib.import_module(DELEGATED[argv[0]])
        except ModuleNotFoundError:
            print(f"error: `labs {argv[0]}` is not available in this version", file=sys.stderr)
            sys.exit(2)
        try:
            sys.exit(module.main(argv[1:]))
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
