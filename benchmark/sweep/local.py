"""The local executor: a sweep's runs in this process or in a pool of processes (a ``members_parallel``
run's member tasks first, in the same pool), with one progress line per finished run."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ensemble_bench.config import RunConfig
from ensemble_bench.members import pool_init as _pool_init
from ensemble_bench.members import pool_run as _pool_run
from ensemble_bench.sweep.estimate import time_left
from ensemble_bench.sweep.jobs import RunJob, member_jobs

@dataclass
class LocalOutcome:
    run_id: str
    status: str            # complete | failed | busy
    error: str | None = None
    seconds: float | None = None   # how long the run took (wall clock)


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h07m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, sec = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def progress_line(i: int, n: int, outcome: LocalOutcome, left_s: float | None) -> str:
    """"[i/n] run_id done in Xs (status); ~Y left", Y = ``left_s`` (``estimate.time_left``; None: "?")."""
    took = format_duration(outcome.seconds) if outcome.seconds is not None else "?"
    eta = "0s" if i >= n else format_duration(left_s) if left_s is not None else "?"
    return f"[{i}/{n}] {outcome.run_id} done in {took} ({outcome.status}); ~{eta} left"


def run_local(runs: list[RunConfig], workers: int = 1, *,
              report: Callable[[LocalOutcome], None] | None = None,
              progress: Callable[[str], None] | None = None,
              estimate: Callable[[list[RunConfig]], Mapping[str, float | None]] | None = None) -> list[LocalOutcome]:
    """Run ``runs`` on this machine: in this process one after another (``workers=1``) or in a pool of
    ``workers`` processes. A failing run is recorded as failed (by the runner) and the others go on.
    ``report`` gets each outcome; ``progress`` one line per finished run (:func:`progress_line`), its time
    left from ``estimate`` (seconds left per run id of the runs not finished, ``estimate.estimate_runs``;
    None: every run counts as the mean of those finished so far)."""
    import time

    report = report or (lambda o: None)
    outcomes: list[LocalOutcome] = []
    durations: list[float] = []
    ended: set[str] = set()   # run ids with an outcome
    n_total = len(runs)
    # a members_parallel run is one task per member, then the run (which waits for them)
    n_tasks = sum(max(1, len(member_jobs(cfg))) for cfg in runs) if workers > 1 else len(runs)
    n_workers = 1 if workers <= 1 or n_tasks <= 1 else min(workers, n_tasks)

    def done(rid: str, summary: dict | None, err: BaseException | None, seconds: float | None) -> None:
        if err is not None:
            o = LocalOutcome(rid, "failed", f"{type(err).__name__}: {err}", seconds)
        elif summary.get("error"):
            o = LocalOutcome(rid, summary.get("status", "failed"), summary["error"], seconds)
        else:
            o = LocalOutcome(rid, summary["status"], None, seconds)
        outcomes.append(o)
        ended.add(rid)
        if seconds is not None and o.status != "busy":
            durations.append(seconds)
        report(o)
        if progress is not None:
            unfinished = [cfg for cfg in runs if cfg.run_id() not in ended]
            left = list(estimate(unfinished).values()) if estimate is not None else [None] * len(unfinished)
            progress(progress_line(len(outcomes), n_total, o, time_left(left, durations, n_workers)))

    if n_workers == 1:
        for cfg in runs:
            rid = cfg.run_id()
            t0 = time.perf_counter()
            try:
                summary = RunJob(cfg.to_dict(), rid)()
            except Exception as e:   # recorded by the runner; the sweep goes on
                done(rid, None, e, time.perf_counter() - t0)
            else:
                done(rid, summary, None, time.perf_counter() - t0)
        return outcomes
    import concurrent.futures as cf
    import multiprocessing

    n = n_workers
    threads = max(1, (os.cpu_count() or 1) // n)
    # members_parallel runs: their member tasks go first (in the same pool), the run itself, which
    # assembles, evaluates and writes the record, once all its member tasks have ended
    waiting = {cfg.run_id(): (cfg, member_jobs(cfg, prefix_logs=True)) for cfg in runs}
    members_left = {rid: len(jobs) for rid, (_, jobs) in waiting.items()}
    with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_pool_init, initargs=(threads,)) as pool:
        futures: dict[Any, tuple[str, bool]] = {}   # future -> (run id, is a member task)

        def submit_run(cfg: RunConfig) -> None:
            futures[pool.submit(_pool_run, RunJob(cfg.to_dict(), cfg.run_id(), prefix_logs=True))] = (cfg.run_id(), False)

        for rid, (cfg, jobs) in waiting.items():
            for job in jobs:
                futures[pool.submit(_pool_run, job)] = (rid, True)
            if not jobs:
                submit_run(cfg)
        try:
            while futures:
                finished, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    rid, is_member = futures.pop(fut)
                    try:
                        summary = fut.result()
                    except Exception as e:   # the worker itself died (e.g. killed for memory)
                        summary, err = None, e
                    else:
                        err = None
                    if is_member:   # a failed member task is trained by the run itself
                        if err is not None or (summary or {}).get("error"):
                            print(f"{rid}: a member task failed ({err or summary['error']}); the run trains "
                                  f"that member itself", file=sys.stderr, flush=True)
                        members_left[rid] -= 1
                        if members_left[rid] == 0:
                            submit_run(waiting[rid][0])
                    elif err is not None:
                        done(rid, None, err, None)
                    else:
                        done(rid, summary, None, summary.get("seconds"))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return outcomes

