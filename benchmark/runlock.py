"""One lock per run id: two processes never train (or evaluate into) the same run at once.

``<out>/.submitit/locks/<run_id>.lock`` is taken with ``flock`` by whoever runs the run (a plain ``run``,
a sweep job, a member task, ``evaluate``); the holder writes "pid host" into it. The kernel drops the
lock when the process ends however it ends, so a record left "running" by a killed process is told
apart from a live one (``lock_owner``) by the sweep's status, the leaderboard and the report. No torch
here: reading who holds a lock is cheap.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator


LOCK_DIR = ".submitit/locks"   # one lock file per run id, shared by plain runs and sweeps


@contextlib.contextmanager
def run_lock(out: Path, run_id: str) -> Iterator[bool]:
    """An exclusive, non-blocking lock on one run (``<out>/.submitit/locks/<run_id>.lock``): yields
    False when another process holds it, so two processes never train the same run at once. The holder
    writes "pid host" into the file (``lock_holder``); the kernel drops the lock when the process ends,
    however it ends."""
    import fcntl

    path = Path(out) / LOCK_DIR / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_holder(out: Path, run_id: str) -> str | None:
    """"pid P on host H" of the process that holds (or last held) the run's lock, if it wrote one."""
    try:
        pid, host = (Path(out) / LOCK_DIR / f"{run_id}.lock").read_text().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return None


def lock_is_held(out: Path, run_id: str) -> bool:
    """Whether a live process holds the run's lock now (a killed process's lock is released). A shared
    lock probes without writing, so the holder line stays and a run starting now is never refused."""
    import fcntl

    path = Path(out) / LOCK_DIR / f"{run_id}.lock"
    if not path.is_file():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, another user's
        return True
    except OSError:
        return True
    return True


def lock_owner(out: Path, run_id: str) -> tuple[bool | None, str | None]:
    """(whether a live process holds the run's lock, "pid P on host H" of the holder or last holder).
    None for the first when it cannot be told (the lock file cannot be opened, e.g. a read-only folder).

    The lock (``run_lock``) is released by the kernel however its process ends, so a
    killed run's lock is free. Probing it means taking it for an instant, which a run starting at that
    very instant would take for another process's, so the probe is avoided where the answer is certain
    without it: no lock file (never locked: not held), a holder on this host whose pid is gone (killed:
    not held). A holder on another host, or a live pid here (it holds the lock, or its pid was reused),
    is probed."""
    path = Path(out) / LOCK_DIR / f"{run_id}.lock"
    if not path.is_file():
        return False, None
    holder = lock_holder(out, run_id)    # read first: a probe that takes the lock rewrites the file
    if holder is not None:
        pid = holder.split()[1]
        if on_this_host(holder) and pid.isdigit() and not _pid_alive(int(pid)):
            return False, holder
    try:
        held = lock_is_held(out, run_id)
    except OSError:
        return None, holder
    return held, holder


def on_this_host(holder: str | None) -> bool:
    return bool(holder) and holder.split()[-1] == socket.gethostname()


def running_state(out: Path, run_id: str) -> tuple[bool, str]:
    """How a record left "running" in ``out`` stands: (whether it is stale, a short text). Stale = no
    process holds its lock (killed or preempted: running it again resumes it from its checkpoint)."""
    held, holder = lock_owner(out, run_id)
    if held:
        return False, f"running ({holder})" if holder else "running"
    if held is None:
        return False, "running or stopped (its lock cannot be read)"
    return True, "stopped: no process holds its lock (killed or preempted; run it again to resume)"
