"""`labs launch` watching its ranks: signals, bounded waits, and what it says when a run ends.

The runner (`deepspeed`, `torchrun`) starts in a session of its own, so a terminal's Ctrl-C reaches
`labs` alone. On SIGTERM or SIGINT `labs` writes the run folder's STOP file: every rank, on every
host that shares the folder, finishes its current step, saves a checkpoint and exits 75
(EXIT_STOPPED). `labs` waits for that for `train.stop_grace` seconds, then ends the runner's process
group (SIGTERM, then SIGKILL); a second signal ends it at once. Nothing is left running.

When a run fails, the ranks' status records (`logs/rank<N>.status.json`, written by each rank at its
start and end) tell which rank failed first: one that left no end record was killed (signal, OOM,
lost host); otherwise the first whose error is not a peer's closed connection. Its host and the last
lines of its own log are printed last.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.common.run_dir import STOP_FILE, STOPPED

PEER_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "connection closed",
               "Socket Timeout", "Timed out waiting", "ProcessGroupGloo", "final barrier failed",
               "another rank", "peer")


@dataclass
class Outcome:
    code: int
    signalled: str | None = None  # the signal that asked the run to stop, if any
    forced: bool = False  # the ranks did not stop within the grace time and were ended


TRAINING_STOP = "every rank finishes its current step, saves a checkpoint and exits"


def run_ranks(cmd: list[str], env: dict[str, str], cwd, run_dir: Path, secrets: list[str], grace: float,
              verbose: bool = False, stopping: str = TRAINING_STOP, who: str = "labs launch") -> Outcome:
    """Run the runner until it and every process of its group have ended; see the module doc. Its
    output passes through a filter: secrets (DeepSpeed's multi-node runner logs its whole pdsh command,
    exports included) become ***, and, unless verbose, the launchers' INFO lines are dropped.
    `stopping` is what the first signal's line says the ranks now do; `who` names the command in STOP."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pump = threading.Thread(target=_pump, args=(proc.stdout, secrets, verbose), daemon=True)
    pump.start()
    state = {"signal": None, "count": 0, "deadline": None}
    outcome = Outcome(code=0)

    def on_signal(signum, frame) -> None:
        state["count"] += 1
        name = signal.Signals(signum).name
        if state["count"] == 1:
            state["signal"], state["deadline"] = name, time.monotonic() + grace
            try:
                (run_dir / STOP_FILE).write_text(f"{name} to {who} (pid {os.getpid()}) at {time.ctime()}\n")
            except OSError:
                pass
            _say(f"\n== {name}: {stopping} (up to {grace:.0f} s; {name} again stops them at once)")
        else:
            _say(f"\n== {name} again: ending the ranks now")
            _end_group(proc.pid)
            state["deadline"] = time.monotonic()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if state["deadline"] is not None and time.monotonic() > state["deadline"] and not outcome.forced:
                _say(f"== the ranks did not stop within {grace:.0f} s: ending them")
                outcome.forced = True
                _end_group(proc.pid)
        # the runner is gone; its group may not be (DeepSpeed's launch.py outlives a killed runner)
        t_end = time.monotonic() + 35
        while _group_alive(proc.pid) and time.monotonic() < t_end:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            _end_group(proc.pid)
    except BaseException:  # the labs process itself fails (an exception, KeyboardInterrupt): no orphan ranks
        _end_group(proc.pid)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    pump.join(timeout=5)
    outcome.code, outcome.signalled = proc.returncode, state["signal"]
    return outcome


LAUNCHER_INFO = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[INFO\] \[(launch|runner|multinode_runner|"
                           r"real_accelerator|constants)\.py")


def _pump(stream, secrets: list[str], verbose: bool) -> None:
    for line in io.TextIOWrapper(stream, newline="", errors="replace"):  # '\r' ends a line too
        for secret in secrets:
            line = line.replace(secret, "***")
        if not verbose and LAUNCHER_INFO.match(line) and "cmd = " not in line:
            continue  # DeepSpeed's launchers' bookkeeping; the command they run (cmd = ...) stays
        sys.stdout.write(line)
        sys.stdout.flush()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _end_group(pgid: int, wait: float = 10) -> None:
    """SIGTERM to the runner's process group, then SIGKILL to what is left after `wait` seconds."""
    for sig, pause in ((signal.SIGTERM, wait), (signal.SIGKILL, 2)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        t_end = time.monotonic() + pause
        while _group_alive(pgid) and time.monotonic() < t_end:
            time.sleep(0.1)


def rank_records(run_dir: Path) -> list[dict]:
    out = []
    for f in sorted((run_dir / "logs").glob("rank*.status.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("rank", 0))


def first_failure(records: list[dict]) -> dict | None:
    """The rank most likely to have caused the failure (see the module doc)."""
    killed = [r for r in records if "exit" not in r]
    if killed:
        return killed[0]
    failed = sorted((r for r in records if r.get("exit") not in (0, None)), key=lambda r: r.get("ended", 0))
    own = [r for r in failed if not any(p in r.get("error", "") for p in PEER_ERRORS)]
    return (own or failed or [None])[0]


def tail(path: Path, n: int = 15) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def failure_report(run_dir: Path, code: int) -> str:
    """What `labs launch` prints last when a run fails: the first failing rank, its host, how it
    ended, and the last lines of its own log (its traceback)."""
    records = rank_records(run_dir)
    bad = first_failure(records)
    if bad is None:
        started = f"{len(records)} rank(s) started" if records else "no rank started"
        return (f"run failed with exit code {code} ({started}); the runner's output is above; "
                f"run folder {run_dir}")
    rank, host = bad.get("rank"), bad.get("host", "?")
    if "exit" not in bad:
        how = ("ended without a word: killed by a signal (kill -9, the out-of-memory killer) or its host "
               "went away")
    else:
        how = f"exited with code {bad['exit']}"
    log = run_dir / "logs" / f"rank{rank}.log"
    lines = tail(log)
    if not lines and bad.get("error"):
        lines = bad["error"].rstrip().splitlines()[-15:]
    others = [r["rank"] for r in records if r is not bad and r.get("exit") not in (0, None, 75)]
    peers = f"; ranks {', '.join(map(str, others))} failed after it" if others else ""
    body = "\n".join(f"  | {x}" for x in lines) if lines else "  (its log is empty)"
    return (f"run failed with exit code {code}: rank {rank} on host {host} {how}{peers}.\n"
            f"last lines of {log}:\n{body}")


def port_lost(run_dir: Path) -> bool:
    """The rendezvous port was taken before rank 0 bound it (no step was trained)."""
    return (not (run_dir / "metrics.jsonl").exists()
            and any("EADDRINUSE" in r.get("error", "") or "ddress already in use" in r.get("error", "")
                    for r in rank_records(run_dir)))


def stopped_mark(run_dir: Path) -> tuple[int, int, int] | None:
    """stopped.json's state (inode, size, mtime in ns) before a launch; None when there is none."""
    try:
        st = (run_dir / STOPPED).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def stopped_record(run_dir: Path, before: tuple[int, int, int] | None) -> dict | None:
    """The stopped.json this launch's ranks wrote: one whose state differs from `before` (what
    `stopped_mark` saw before the launch). A resumed run's folder keeps the stop record of the launch
    it continues; comparing its time with the clock mistook it for this launch's (a file system whose
    times run ahead of this host's clock, or a resume started within a second of the stop)."""
    if stopped_mark(run_dir) in (None, before):
        return None
    try:
        return json.loads((run_dir / STOPPED).read_text())
    except (OSError, ValueError):
        return None
