"""How long a sweep's runs will take, from the records already in their results folders.

A run is estimated from the complete records of the same configuration in its folder: the same data (by
their sha256), backbone, method and method options, trained on the same kind of device (CPU or CUDA), any
seed, recipe or budget. Each such record says what its training cost: per stage it trained itself, the
median epoch (training plus validation; a median, so that an epoch stretched by a paused or shared machine
does not count) times its epochs, scaled to the run's epochs, plus its evaluation. A stage it loaded from the
stage store costs nothing, as it will cost nothing again in a sweep of the same shape (seed 1's DE-3 reuses
seed 1's DE-2 members, as seed 0's did). A run that stopped part way resumes from its checkpoints: the epochs
they hold are taken off. The estimate is the mean over those records; a configuration no record has tried
gets none (:func:`time_left` fills it in with the mean of the runs finished so far).

Why records rather than one mean duration per run: a sweep mixes runs 10x apart (MIMO's batch repetition
trains 4 copies of every batch; a deep ensemble of 4 trains 4 members), and a run resumed from a checkpoint
finishes in minutes. On the reference sweep, the mean over finished runs said "~34m left" after a resumed
run with 4 hours of runs still to go.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from ensemble_bench.columns import device_kind
from ensemble_bench.config import RunConfig, canonical_json


def _run_kind(cfg: RunConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _key(data_sha: Any, backbone: Any, method: Any, options: Any, kind: Any) -> tuple:
    return (data_sha, backbone, method, canonical_json(options or {}), kind)


def record_profile(rec: Mapping) -> tuple[int, dict[str, tuple[float, int]], float] | None:
    """(run epochs, {stage: (median epoch seconds, epochs)} for the stages it trained itself, evaluation
    seconds) of a complete record; None when it has no learning curve to time."""
    cfg = rec.get("config") or {}
    training = rec.get("training") or {}
    stages: dict[str, tuple[float, int]] = {}
    for name, st in (training.get("stages") or {}).items():
        if not isinstance(st, Mapping) or st.get("reused_from"):
            continue
        times = [float(e.get("epoch_s") or 0.0) + float(e.get("val_s") or 0.0)
                 for e in st.get("curve") or [] if isinstance(e, Mapping)]
        if times:
            stages[str(name)] = (statistics.median(times), len(times))
        elif isinstance(st.get("train_s"), (int, float)) and isinstance(st.get("epochs"), int) and st["epochs"] > 0:
            stages[str(name)] = (float(st["train_s"]) / st["epochs"], st["epochs"])   # no curve: its mean epoch
    epochs = cfg.get("epochs")
    if not isinstance(epochs, int) or epochs < 1 or not (stages or training.get("stages")):
        return None
    return epochs, stages, float((rec.get("timings") or {}).get("eval_s") or 0.0)


def epochs_done(out: Path, run_id: str) -> dict[str, int]:
    """{stage: epochs finished} from an interrupted run's checkpoints (``<out>/.ckpt/<run_id>/<stage>.pt``,
    written by ``train.Trainer`` after every epoch); {} when it has none or they cannot be read."""
    folder = out / ".ckpt" / run_id
    if not folder.is_dir():
        return {}
    import torch

    done: dict[str, int] = {}
    for f in folder.glob("*.pt"):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            done[f.stem] = len(state["result"]["history"])
        except Exception:   # being rewritten (atomically) or from other code: no progress known, an overestimate
            continue
    return done


def estimate_runs(cfgs: Sequence[RunConfig]) -> dict[str, float | None]:
    """{run id: estimated seconds left to train and evaluate it} (module docstring), None where no record of
    its configuration exists yet. ``cfgs`` are resolved (a sweep's runs are: their run ids are known)."""
    from ensemble_bench.records import load_records

    profiles: dict[Path, dict[tuple, list]] = {}
    out: dict[str, float | None] = {}
    for cfg in cfgs:
        folder = Path(cfg.out)
        if folder not in profiles:
            index: dict[tuple, list] = defaultdict(list)
            if folder.is_dir():
                for rec in load_records(folder)[0]:
                    c, p = rec.get("config") or {}, record_profile(rec)
                    if p is not None:
                        index[_key((c.get("data_id") or {}).get("sha256"), c.get("backbone"), c.get("method"),
                                   c.get("options"), device_kind((rec.get("training") or {}).get("device")))].append(p)
            profiles[folder] = index
        rid = cfg.run_id()
        found = profiles[folder].get(_key((cfg.data_id or {}).get("sha256"), cfg.backbone, cfg.method, cfg.options,
                                          _run_kind(cfg)))
        if not found:
            out[rid] = None
            continue
        same_budget = [p for p in found if p[0] == cfg.epochs] or found
        done = epochs_done(folder, rid)
        guesses = []
        for epochs, stages, eval_s in same_budget:
            scale = cfg.epochs / epochs
            guesses.append(eval_s + sum(sec * max(0.0, n * scale - done.get(name, 0))
                                        for name, (sec, n) in stages.items()))
        out[rid] = sum(guesses) / len(guesses)
    return out


def time_left(left: Sequence[float | None], durations: Sequence[float], workers: int) -> float | None:
    """Wall seconds until the runs ``left`` (their estimates; None: unknown) are done on ``workers``
    processes: their total over the workers, or the longest of them if that is longer. An unknown one counts
    as the mean of the ``durations`` of the runs finished so far, else of the known estimates; None when
    there is nothing to go on."""
    if not left:
        return 0.0
    known = [x for x in left if x is not None]
    fill = (sum(durations) / len(durations) if durations else sum(known) / len(known) if known else None)
    if fill is None:
        return None
    xs = [fill if x is None else x for x in left]
    return max(sum(xs) / max(1, min(workers, len(xs))), max(xs))
