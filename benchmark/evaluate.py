"""``ensemble-bench evaluate``: shift and OOD metrics added to complete records without training, from
their kept weights (``rebuild``: the method's architecture, then a strict load of the weights).

A record is data, never code: evaluate imports no plugin because a record names it. A record whose run
used plugins (``config.plugins``) is evaluated only with plugins the user imported (``--plugin``) that
stand for them (the same path or module, or a file of the same content) and whose file is the one the
run was trained with (``code.plugins``: its sha256); anything else is one line naming the plugin."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import ensemble_bench.methods as methods
from ensemble_bench.api import EnsembleModel, FitContext
from ensemble_bench.config import RunConfig
from ensemble_bench.errors import UsageError
from ensemble_bench.runlock import lock_holder, run_lock
from ensemble_bench.runner import (_now, check_model, check_output_dir, code_identity, cost_device_name, make_method,
                                   resolve_device)


def _record_targets(target: str | os.PathLike) -> tuple[Path, list[tuple[Path, dict]], list[str]]:
    """(folder, [(record path, record)] of the complete records, problems) of a runs folder or one record."""
    from ensemble_bench import records

    p = Path(target)
    if p.is_dir():
        recs, problems = records.load_records(p)
        return p, [(records.record_path(p, r["run_id"]), r) for r in recs], problems
    if p.is_file() and p.name.endswith(".json"):
        try:
            rec = records.read_record(p)
            if rec["status"] == "complete":
                records._check_complete(rec, str(p))
        except records.RecordError as e:
            raise UsageError(str(e)) from None
        if rec["status"] != "complete":
            raise UsageError(f"{p}: status {rec['status']!r}; only complete runs can be evaluated again")
        if p.name != f"{rec['run_id']}.json":
            raise UsageError(f"{p}: holds run {rec['run_id']}, whose record is named {rec['run_id']}.json")
        return p.parent, [(p, rec)], []
    if p.exists():
        raise UsageError(f"{p}: not a runs folder or a <run_id>.json record")
    raise UsageError(f"{p}: no such runs folder or record")


class EvaluationIncomplete(UsageError):
    """A folder's evaluation skipped records (each already one line on the log), after evaluating the
    others: exit code 2 from the CLI. ``done``: the summaries of the records evaluated (and written);
    ``skipped``: the lines of those skipped."""

    def __init__(self, message: str, done: list[dict], skipped: list[str]):
        super().__init__(message)
        self.done, self.skipped = done, skipped


def _plugin_key(spec: str) -> str:
    """A record's plugin spec in the form ``plugins.normalise`` gives (without importing or requiring it)."""
    from ensemble_bench import plugins

    spec = spec.strip()
    if not plugins.is_file_spec(spec):
        return spec
    try:
        p = Path(spec).expanduser()
        return str((p if p.is_absolute() else Path.cwd() / p).resolve())
    except (OSError, RuntimeError):
        return spec


def record_plugins(record: dict) -> list[str]:
    """The specs of the plugins already imported in this process (``--plugin``; ``plugins.load``) that
    stand for the plugins the record's run used: for each of ``config.plugins``, the imported plugin of the
    same spec, else (a moved file) an imported plugin file whose sha256 is the record's for it. Imports
    nothing. UsageError (one line) for a plugin not imported, or one whose sha256 differs from the record's
    ``code.plugins`` (the weights were trained with other code)."""
    from ensemble_bench import plugins

    run_id = record.get("run_id")
    specs = (record.get("config") or {}).get("plugins") or []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list) or not all(isinstance(s, str) and s.strip() for s in specs):
        raise UsageError(f"{run_id}: its config.plugins is not a list of plugin files or module names; skipped")
    code = record.get("code")
    entries = (code.get("plugins") if isinstance(code, dict) else None) or []
    hashes = ({e.get("spec"): e.get("sha256") for e in entries if isinstance(e, dict)}
              if isinstance(entries, list) else {})   # what the run recorded of each plugin it imported
    loaded = {p["spec"]: p for p in plugins.loaded()}
    out = []
    for spec in specs:
        want = hashes.get(spec)
        info = loaded.get(_plugin_key(spec))
        if info is None and want and plugins.is_file_spec(spec):   # the file moved since: the same content
            info = next((p for p in loaded.values() if plugins.is_file_spec(p["spec"]) and p["sha256"] == want),
                        None)
        if info is None:
            raise UsageError(f"{run_id}: its run used the plugin {spec}, which evaluate never imports because "
                             f"a record names it: pass --plugin {spec} if you trust that code; skipped")
        if want and info["sha256"] and info["sha256"] != want:
            raise UsageError(f"{run_id}: plugin {info['spec']} is not the code this run was trained with (file "
                             f"sha256 {info['sha256']}, the record's {want}): its weights belong to other code; "
                             f"skipped")
        out.append(info["spec"])
    return list(dict.fromkeys(out))


def rebuild(record: dict, out: Path, *, data_dir: str | None = None, device: torch.device | None = None):
    """The trained ensemble of a complete record, from its kept weights: the RunConfig from the record's
    config (its run id must be the record's: same code, options and data), the method's untrained
    architecture (``build``, as ``cost`` does; NFE's SNIP on its synthetic batch, whose masks the weights
    replace), then a strict load of ``<run_id>.weights.safetensors``. The run's plugins must already be
    imported (``record_plugins``): a record naming a plugin never makes this import it. Returns (cfg,
    method, model) with the model in eval mode on ``device`` (default cpu). Raises UsageError (one line)
    for anything that does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ensemble_bench import records
    from ensemble_bench import distributed
    from ensemble_bench.resolve import make_run_config
    from ensemble_bench.data import IMAGE_SHAPES, NUM_CLASSES

    run_id = record["run_id"]
    plugin_specs = record_plugins(record)   # before anything else: the record's own specs are never imported
    wpath = out / f"{run_id}{records.WEIGHTS_SUFFIX}"
    if not wpath.is_file():
        raise UsageError(f"{run_id}: no kept weights ({wpath.name} is missing): the run was made with "
                         f"--no-keep-weights or before weights were kept; skipped")
    values = {k: v for k, v in dict(record.get("config") or {}).items() if k != "shift"}
    values["plugins"] = plugin_specs   # imported already: make_run_config finds them loaded, imports nothing
    values["out"] = str(out)
    values["device"] = "cpu"
    values["progress"] = False
    if data_dir is not None:
        values["data_dir"] = str(data_dir)
    # a run trained on several data-parallel ranks has their number in its id (distributed.recipe_fields)
    world = ((record.get("config") or {}).get("effective_recipe") or {}).get("world_size")
    try:
        with distributed.assume_world_size(world if isinstance(world, int) and world > 1 else 1):
            cfg = make_run_config(values)
            here = cfg.run_id()
    except UsageError as e:
        raise UsageError(f"{run_id}: its config cannot be read back ({e})") from None
    if here != run_id:
        theirs = (record["config"].get("data_id") or {}).get("sha256")
        why = (f"the data in {cfg.data_dir or 'the default data folder'} differ from the run's (data sha256 "
               f"{cfg.data_id['sha256']} vs {theirs})" if cfg.data_id["sha256"] != theirs else
               f"the data are the run's (sha256 {theirs}), so the method's options or the code's recipe rules "
               f"changed since")
        raise UsageError(f"{run_id}: its config gives run id {here} here: {why}; skipped")
    device = device or torch.device("cpu")
    method = make_method(cfg)
    channels, size = IMAGE_SHAPES[cfg.dataset]
    ctx = FitContext(config=cfg, num_classes=NUM_CLASSES[cfg.dataset], in_channels=channels, image_size=size,
                     device=torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):   # building draws initial weights: leave the caller's RNG alone
        model = check_model(method.build(ctx), cfg.method)
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{run_id}: cannot read {wpath.name} ({str(e).splitlines()[0][:200]}); skipped") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise UsageError(f"{run_id}: {wpath.name} does not fit the architecture this code builds for "
                         f"{cfg.method} ({why}); skipped") from None
    return cfg, method, model.to(device).eval()


def _max_abs_diff(a: torch.Tensor, b: Any) -> float:
    import numpy as np

    a16 = a.float().numpy().astype(np.float16).astype(np.float32)
    b = np.asarray(b, dtype=np.float32)
    return float(np.abs(a16 - b).max()) if a16.shape == b.shape else float("inf")


def evaluate_records(target: str | os.PathLike, *, shift: str | None = None, ood: list[str] | None = None,
                     data_dir: str | None = None, device: str = "auto", progress: bool = True,
                     log: Callable[[str], None] | None = None, plugins: list[str] | None = None) -> list[dict]:
    """``ensemble-bench evaluate``: add shift (``shift``) and OOD (``ood`` names) metrics to complete
    records without training, from their kept weights (see ``rebuild``).

    For each record: the clean validation and test predictions are computed again (the temperature of the
    shift metrics is fitted on validation, OOD scores need the test split) and compared with the saved
    ones; ``metrics.shift`` (replaced) and ``metrics.ood.<name>`` (added or replaced) are written into the
    record atomically under the run's lock, everything else kept, with an entry in ``evaluations``; the
    predictions file gets the new arrays. ``plugins``: plugins to import first (as ``--plugin``, which the
    CLI imports before this); a record's plugins are never imported because it names them
    (``record_plugins``).

    One record (``<run_id>.json``): anything that keeps it from being evaluated is UsageError (one line,
    exit 2). A folder: a record that cannot be evaluated (no weights, another dataset, other data, a
    plugin not given, weights that do not reproduce its predictions) is one line on ``log`` and skipped,
    the others are evaluated; then, if any was skipped, EvaluationIncomplete (a UsageError: exit 2) with
    one line that counts them and the summaries of those done. Returns one summary per evaluated record."""
    from ensemble_bench import data as data_mod
    from ensemble_bench.config import check_shift
    from ensemble_bench.resolve import shift_data_dir
    from ensemble_bench.shift import SHIFT_SETS, load_shift_set

    from ensemble_bench import plugins as plugins_mod

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    ood = list(dict.fromkeys(ood or []))
    plugins_mod.load_all(plugins)   # the caller's own (trusted) plugins
    if not shift and not ood:
        raise UsageError("evaluate needs --shift NAME and/or --ood NAME (what to add to the records)")
    if shift is not None and shift not in SHIFT_SETS:
        raise UsageError(f"unknown shift set {shift!r}; choose from {', '.join(SHIFT_SETS)}")
    dev = resolve_device(device)
    out, targets, problems = _record_targets(target)
    check_output_dir(out, "evaluate: the records folder")   # records are rewritten in place: writable first
    one = not Path(target).is_dir()   # one record: its problem is the command's one line, not a skip
    for p in problems:
        log(f"warning: {p}")
    if not targets:
        raise UsageError(f"no complete run records in {target}")
    refused: dict[str, str] = {}   # run id -> why its plugins are not there (nothing a record names is imported)
    for _, rec in targets:
        try:
            record_plugins(rec)
        except UsageError as e:
            if one:
                raise UsageError(_unskipped(str(e))) from None
            refused[rec["run_id"]] = str(e)
    # the OOD sets of the built-in datasets and of every dataset (a user's TOML too) of these records
    known_ood = sorted({o for sets in data_mod.OOD_SETS.values() for o in sets}
                       | {o for _, rec in targets if rec["run_id"] not in refused
                          for o in data_mod.OOD_SETS.get((rec.get("config") or {}).get("dataset"), ())})
    bad = [o for o in ood if o not in known_ood]
    if bad:
        raise UsageError(f"unknown OOD set {bad[0]!r}; choose from {', '.join(known_ood)}"
                         + (f"; the datasets of {len(refused)} record(s) whose plugins were not given with "
                            f"--plugin may have more" if refused else ""))
    shift_sets: dict[str, Any] = {}

    def shift_set_for(cfg_data_dir) -> Any:   # one load per data folder (checked before any record is touched)
        root = str(shift_data_dir(cfg_data_dir))
        if root not in shift_sets:
            shift_sets[root] = load_shift_set(shift, root)
        return shift_sets[root]

    if shift is not None and data_dir is not None:
        shift_set_for(data_dir)   # a missing or bad set: one line, nothing evaluated
    done: list[dict] = []
    skipped: list[str] = []

    def skip(msg: str) -> None:   # one line per record, printed once
        if one:
            raise UsageError(_unskipped(msg))
        skipped.append(msg)
        log(msg)

    for path, rec in targets:
        run_id = rec["run_id"]
        dataset = (rec.get("config") or {}).get("dataset")
        if run_id in refused:
            skip(refused[run_id])
            continue
        try:
            if shift is not None:
                check_shift(shift, dataset)
            missing = [o for o in ood if o not in data_mod.OOD_SETS.get(dataset, ())]
            if missing:
                raise UsageError(f"OOD set {missing[0]!r} is not one of {dataset}'s "
                                 f"({', '.join(data_mod.OOD_SETS.get(dataset, ())) or 'none'})")
            cfg, _, model = rebuild(rec, out, data_dir=data_dir, device=dev)
            sset = shift_set_for(cfg.data_dir) if shift is not None else None
        except UsageError as e:
            msg = str(e)
            skip(msg if msg.startswith(run_id) else f"{run_id}: {msg}; skipped")
            continue
        with run_lock(out, run_id) as mine:
            if not mine:
                skip(f"{run_id}: in use by another process ({lock_holder(out, run_id) or 'unknown'}); skipped")
                continue
            try:
                done.append(_evaluate_one(path, out, cfg, model, dev, sset, ood, progress, log))
            except UsageError as e:   # found before anything is written: the record stays as it was
                skip(str(e))
    if skipped:   # each already one line above: a count, not the lines again
        raise EvaluationIncomplete(
            f"{len(skipped)} of {len(targets)} record(s) skipped (why: the lines above); the other {len(done)} "
            f"evaluated" if done else f"nothing evaluated: all {len(skipped)} record(s) skipped (why: the lines "
            f"above)", done, skipped)
    if not done:
        raise UsageError("nothing evaluated")
    return done


def _unskipped(msg: str) -> str:
    """A skip line as the error of a command given one record (nothing else to go on to)."""
    return msg[:-len("; skipped")] if msg.endswith("; skipped") else msg


def check_same_model(run_id: str, recorded: dict, now: dict, n: int) -> None:
    """UsageError (the record is skipped) when the rebuilt model's clean test accuracy or NLL is not the
    record's: its weights file is another model's. Tolerances allow another device's rounding (a few images
    near a tie, 0.1 % of the NLL), far below what separates two seeds."""
    n = max(n, 1)
    for key, tol in (("acc", 1e-3 + 2 / n), ("nll", 1e-3 * max(abs(float(recorded.get("nll") or 0.0)), 1.0))):
        theirs, mine = recorded.get(key), now.get(key)
        if isinstance(theirs, (int, float)) and isinstance(mine, (int, float)) and not abs(mine - theirs) <= tol:
            raise UsageError(f"{run_id}: the rebuilt model's test {key} is {mine:.4f}, the record's {theirs:.4f}: "
                             f"its weights file is not the model this record was made with; skipped")


def _evaluate_one(path: Path, out: Path, cfg: RunConfig, model: EnsembleModel, device: torch.device, sset: Any,
                  ood: list[str], progress: bool, log: Callable[[str], None]) -> dict:
    """Evaluate one rebuilt model and update its record and predictions (the caller holds the run's lock)."""
    from ensemble_bench import data as data_mod
    from ensemble_bench import metrics as metrics_mod
    from ensemble_bench import predictions, records
    from ensemble_bench.shift import evaluate_shift
    from ensemble_bench.train import Trainer

    run_id = cfg.run_id()
    t0 = time.perf_counter()
    bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.val_fraction)
    trainer = Trainer(bundle, cfg, device, log=log)
    model = trainer.prepare(model).eval()
    test_logits = trainer.predict(model, trainer.data.test.x)
    labels = trainer.data.test.y.cpu()
    val_logits = trainer.predict(model, trainer.data.val.x) if trainer.data.val is not None else None
    val_labels = trainer.data.val.y.cpu() if val_logits is not None else None
    entry: dict[str, Any] = {"at": _now(), "device": cost_device_name(device),
                             "code": code_identity(methods.get(cfg.method), cfg.plugins)}
    # the rebuilt model is the record's: its test accuracy and NLL are the record's (with or without a
    # predictions file to compare logits with; another seed's weights under this name never pass)
    rec = records.read_record(path)   # read once: the caller holds the run's lock, so nothing rewrites it meanwhile
    now = {"acc": metrics_mod.accuracy(metrics_mod.ensemble_probs(test_logits, model.combine), labels),
           "nll": metrics_mod.nll(test_logits, labels, model.combine)}
    check_same_model(run_id, rec.get("metrics") or {}, now, len(labels))
    ppath = records.predictions_path(out, run_id)
    saved = None
    if ppath.is_file():
        try:
            saved = predictions.load_predictions(ppath)
        except (OSError, ValueError) as e:
            log(f"warning: {run_id}: saved predictions unreadable ({' '.join(str(e).split())[:200]}); not updated")
    if saved is not None:   # the rebuilt model gives the run's predictions (to the float16 they were saved in)
        diff = _max_abs_diff(test_logits, saved["logits"])
        entry["test_logits_max_abs_diff"] = diff
        if not diff <= 4e-3 * max(float(test_logits.abs().max()), 1.0):   # ~4 float16 steps at the largest logit
            raise UsageError(f"{run_id}: the rebuilt model's test logits differ from the saved ones by up to "
                             f"{diff:.3g}: its weights file is not the model this record was made with; skipped")
    arrays: dict[str, Any] = {}
    new_ood: dict[str, Any] = {}
    if ood:
        ood_logits = {o: trainer.predict(model, trainer.data.ood[o]) for o in ood}
        id_scores = metrics_mod.ood_scores(test_logits, model.combine)   # the clean metrics are the record's
        for o, z in ood_logits.items():
            o_scores = metrics_mod.ood_scores(z, model.combine)
            new_ood[o] = {k: metrics_mod.ood_metrics(id_scores[k], o_scores[k]) for k in metrics_mod.OOD_SCORES}
        arrays.update({f"ood_{o}": z for o, z in ood_logits.items()})
        entry["ood"] = list(ood)
    new_shift = shift_s = None
    if sset is not None:
        t_shift = time.perf_counter()
        shift_logits: dict[str, Any] = {}
        new_shift = evaluate_shift(lambda x: trainer.predict(model, x), sset, val_logits=val_logits,
                                   val_labels=val_labels, combine=model.combine, progress=progress,
                                   logits_out=shift_logits)
        shift_s = time.perf_counter() - t_shift
        arrays.update(shift_logits)
        entry.update(shift=sset.name, shift_eval_s=shift_s)
    metrics = rec.setdefault("metrics", {})
    if new_ood:
        metrics.setdefault("ood", {}).update(new_ood)
    if new_shift is not None:
        metrics["shift"] = new_shift
        rec.setdefault("data", {})["shift"] = sset.describe()
        rec.setdefault("timings", {})["shift_eval_s"] = shift_s
    entry["eval_s"] = time.perf_counter() - t0
    rec.setdefault("evaluations", []).append(entry)
    if saved is not None:
        predictions.update_predictions(ppath, arrays, drop_prefixes=("shift_",) if sset is not None else ())
    records.write_record(out, rec)
    summary: dict[str, Any] = {"run_id": run_id, "record": str(path)}
    if new_shift is not None:
        m = new_shift["mean"]
        summary.update(shift=sset.name, shift_acc=round(m["acc"], 6), shift_nll=round(m["nll"], 6),
                       shift_eval_s=round(shift_s, 2))
    for o in ood:
        summary[f"auroc_{o}"] = round(new_ood[o]["msp"]["auroc"], 6)
    log(f"{run_id}: evaluated in {entry['eval_s']:.1f}s")
    return summary
