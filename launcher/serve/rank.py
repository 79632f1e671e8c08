"""One rank of `labs serve`: `python -m launcher.serve.rank --spec SERVE_DIR/serve.json`, started by
`labs serve` alone (one rank) or through the deepspeed runner / torchrun (N tensor-parallel ranks).

Rank 0 starts the HTTP server at once (GET /health answers 503 while the model loads) and runs the
engine on a thread; ranks 1..N-1 follow its broadcast steps. SIGTERM (or the serve folder's STOP file,
which `labs serve` writes on SIGTERM) drains rank 0: new requests get 503, running ones finish within
`grace` seconds or are cut, then every rank is told to quit and exits 0. Each rank writes
`logs/rank<N>.status.json` at its start and end, as training ranks do (`labs serve` names a rank
that died from them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from launcher.common.errors import LabsError
from launcher.common.proc import single_process_env
from launcher.common.run_dir import STOP_FILE
from launcher.rank.setup import quiet_console, to_console
from launcher.serve.metrics import Metrics


def _status(serve_dir: Path, rank: int, **fields) -> None:
    f = serve_dir / "logs" / f"rank{rank}.status.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    rec = json.loads(f.read_text()) if f.is_file() else {"rank": rank, "host": socket.gethostname(),
                                                           "started": time.time()}
    f.write_text(json.dumps(rec | fields))


def _rank0(spec: dict, serve_dir: Path) -> int:
    # keeps torch and DeepSpeed out of the labs process
    import uvicorn

    # keeps torch and DeepSpeed out of the labs process
    from launcher.serve.batcher import Engine

    # keeps torch and DeepSpeed out of the labs process
    from launcher.serve.http import make_app


    engine = Engine(lambda: _load(spec), Metrics(), spec["max_batch"], spec["max_queue"], serve_dir / STOP_FILE)
    engine.grace = spec["grace"]
    app = make_app(engine, spec["name"], spec.get("adapters") or {}, os.environ.get("LABS_API_KEY") or None)
    config = uvicorn.Config(app, host=spec["host"], port=spec["port"], log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _Server(config)
    engine.on_stop = lambda: setattr(server, "should_exit", True)

    def on_signal(signum, frame) -> None:
        engine.drain(spec["grace"], f"stopping ({signal.Signals(signum).name})")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sys.setswitchinterval(0.001)  # the HTTP thread gets the GIL within 1 ms of the engine thread's Python code
    engine.thread.start()
    server.run()
    engine.thread.join(timeout=spec["grace"] + 10)
    if engine.state == "failed":
        print(f"[rank 0] error: {engine.error}", file=sys.stderr, flush=True)
        return 1
    return 0


def _load(spec: dict):
    # keeps torch and DeepSpeed out of the labs process
    from launcher.serve.models import load
    loaded = load(spec)
    print(f"[rank 0] serving {spec['name']} on http://{spec['host']}:{spec['port']}/v1 "
          f"(context {loaded.context}, chat template {loaded.chat_template})", flush=True)
    to_console(f"== ready: http://{spec['host']}:{spec['port']}/v1 ({spec['name']})\n")
    return loaded


class _Server:
    """uvicorn's server without its own signal handling (rank 0 drains first, then tells it to exit)."""

    def __init__(self, config) -> None:

        # keeps torch and DeepSpeed out of the labs process
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        self.server = Quiet(config)

    @property
    def should_exit(self) -> bool:
        return self.server.should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.server.should_exit = value

    def run(self) -> None:
        self.server.run()
        if not self.server.started:
            raise LabsError(f"the HTTP server could not start on {self.server.config.host}:{self.server.config.port}"
                            f" (in use?); choose another --port")


def _follower(spec: dict) -> int:
    # keeps torch and DeepSpeed out of the labs process
    from launcher.serve.models import load

    # keeps torch and DeepSpeed out of the labs process
    from launcher.serve.ranks import Channel, follow
    loaded = load(spec)
    why = follow(loaded.kv, Channel(), loaded.with_adapters, spec["grace"] + 15)
    print(f"[rank {os.environ.get('RANK')}] rank 0 said quit: {why}", flush=True)
    return 0


def _leave(code: int) -> None:
    """Leave without tearing gloo down (a peer that left first makes that abort): a last barrier when all
    went well, then os._exit."""
    # keeps torch and DeepSpeed out of the labs process
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and code == 0:
        try:
            dist.barrier()
        except Exception as e:  # noqa: BLE001 - a peer died after quitting
            print(f"[rank {os.environ.get('RANK', '0')}] final barrier failed: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="launcher.serve.rank")
    p.add_argument("--spec", required=True, help="serve.json written by `labs serve`")
    p.add_argument("--local_rank", type=int, help="(the deepspeed launcher's; LOCAL_RANK is read instead)")
    args = p.parse_args(argv)
    spec_file = Path(args.spec)
    spec, serve_dir = json.loads(spec_file.read_text()), spec_file.parent
    single_process_env()
    rank = int(os.environ["RANK"])
    quiet_console(serve_dir / "logs" / f"rank{rank}.log", rank)
    _status(serve_dir, rank)
    code, error = 1, ""
    try:
        code = _rank0(spec, serve_dir) if rank == 0 else _follower(spec)
    except LabsError as e:
        error = str(e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except BaseException:  # noqa: BLE001 - recorded for labs serve's failure report, then the rank ends
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
    _status(serve_dir, rank, exit=code, ended=time.time(), **({"error": error[-2000:]} if error else {}))
    threading.Thread(target=_leave, args=(code,), daemon=True).start()
    time.sleep(30)  # the barrier did not return: leave anyway
    os._exit(code)


if __name__ == "__main__":
    main()
