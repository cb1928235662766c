"""One training loop for every method; methods plug in through small hooks.

``Trainer.fit(model, stage=..., epochs=...)`` trains one stage. Hooks:
  loss_fn(model, x, y) -> loss           default: cross-entropy summed over members of model(x) [M, B, C]
  batch_transform(x, y) -> (x, y)        e.g. MIMO's slot batches, mixup
  after_step(model, step)                e.g. re-apply sparsity masks, topology updates
  recipe=Recipe                          the stage's recipe (default: the run's effective recipe)
  stateful=[obj, ...]                    objects with state_dict()/load_state_dict() saved in checkpoints
  optimizer_from="stage"                 start from the optimiser state (momentum) that the stage this
                                         trainer finished last ended with: one run that goes on across stages
Every epoch ends with an atomic checkpoint (model, optimiser, RNG and data-order state, history). A
stage that finds its checkpoint resumes from it; a finished stage is not trained again, so a killed
multi-stage run loses at most the epoch in progress. A NaN/inf loss stops the run with a clear error.
"""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ensemble_bench import distributed
from ensemble_bench.api import default_loss
from ensemble_bench.data import DataBundle, Split
from ensemble_bench.errors import TrainingDiverged
from ensemble_bench.loader import Normalizer, TensorLoader
from ensemble_bench.recipe import Recipe, is_cycle_end, lr_factor  # noqa: F401  (lr_factor: re-exported)


def stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


@dataclass(frozen=True)
class Stage:
    """The settings of one training stage, as one object (``Trainer.fit(model, Stage(...))``, or the same
    fields as keywords: ``fit(model, stage="member0", seed=...)``). Everything left at its default is a
    *plain* stage of the run's recipe, which the stage store can share between runs.

    ``recipe`` (default: the run's effective recipe; ``epochs`` replaces its length); ``loss_fn(model, x,
    y)`` (default: cross-entropy summed over members); ``batch_transform(x, y)`` on each global batch;
    ``after_step(model, step)``; ``params`` (parameter groups; a group's ``lr_scale`` multiplies the lr and
    its ``name`` labels it in the record); ``select`` ("last" or "best_val" on ``select_metric``);
    ``val_fn(model)`` (a float recorded as ``val``, or a dict) or ``val_model`` (what predicts from images,
    when the trained module is a wrapper); ``seed`` of the data order; ``split`` (default: the training
    split); ``stateful`` objects saved in checkpoints; ``on_epoch_end(model, epoch)``;
    ``optimizer_from`` (the stage whose optimiser state, e.g. momentum, this one continues);
    ``converges=False`` for an exploration phase that the next stage continues (the convergence rule skips
    it)."""

    name: str = "main"
    recipe: Recipe | None = None
    epochs: int | None = None
    loss_fn: Callable | None = None
    batch_transform: Callable | None = None
    after_step: Callable | None = None
    params: Any = None
    select: str = "last"
    select_metric: str = "val_nll"
    val_fn: Callable[[nn.Module], Any] | None = None
    val_model: nn.Module | None = None
    seed: Any = None
    split: Split | None = None
    stateful: tuple = ()
    on_epoch_end: Callable[[nn.Module, int], None] | None = None
    optimizer_from: str | None = None
    converges: bool = True

    @property
    def plain(self) -> bool:
        """Fully determined by the initial weights, the recipe, the data-order seed, the selection rule,
        the precision and the code: no hook, no custom loss or parameters, the training split."""
        return (self.loss_fn is None and self.batch_transform is None and self.after_step is None
                and self.params is None and not self.stateful and self.val_fn is None and self.val_model is None
                and self.on_epoch_end is None and self.optimizer_from is None and self.split is None)


@dataclass
class StageResult:
    stage: str
    epochs: int
    steps: int = 0
    samples_seen: int = 0
    train_s: float = 0.0
    flops_per_sample: float | None = None
    best_epoch: int | None = None
    best_val: float | None = None
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    reused_from: str | None = None   # "<run id>/<stage>" when this stage was not trained but reused
    recipe: dict = field(default_factory=dict)      # the stage's recipe as trained (ensemble_bench.recipe)
    select: str = "last"
    select_metric: str | None = None
    converges: bool = True     # meant to converge (an exploration phase is not): the convergence rule reads it
    # one entry per time this stage's training started or resumed: {"from_epoch", "device", "precision"} (a
    # run killed and resumed on another machine trained its epochs on two devices; its train_s is their sum)
    segments: list[dict] = field(default_factory=list)

    @property
    def train_flops(self) -> float | None:
        if self.flops_per_sample is None:
            return None
        return 3.0 * self.flops_per_sample * self.samples_seen


def _standard_error(x: torch.Tensor) -> float:
    """The standard error of the mean of ``x`` (sample std, ddof=1, / sqrt(n)); 0 for fewer than 2 values."""
    n = int(x.numel())
    return float(x.double().std(unbiased=True) / n ** 0.5) if n > 1 else 0.0


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: Path, device: torch.device | str) -> dict:
    """A checkpoint written by the trainer, loaded with ``weights_only=True``: tensors, numbers, strings
    and containers only, so a file planted in a results folder cannot run code."""
    from ensemble_bench.errors import UsageError

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # an unpickling error names what the file tried to load (keep only that)
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        what = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
        reason = what.group(0) if what else type(e).__name__
        raise UsageError(f"refusing checkpoint {path}: not a plain-tensor checkpoint of this suite ({reason}); "
                         f"delete it to train that stage again") from None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_code(model: nn.Module) -> str:
    """A hash of the source files that define the model's module classes outside torch and this harness (whose
    own hash salts the stage store's keys): a method's or a plugin's file, a timm model's. A stage whose forward
    another version of that code computes is another stage, though its ``repr`` and weights are the same."""
    import inspect

    import ensemble_bench.methods as methods

    torch_dir, harness = Path(torch.__file__).resolve().parent, Path(__file__).resolve().parent
    methods_dir = Path(methods.__file__).resolve().parent    # inside the harness's folder once installed
    files: dict[str, Path] = {}
    for cls in {type(m) for m in model.modules()}:
        try:
            path = Path(inspect.getsourcefile(cls) or "").resolve()
        except TypeError:   # a built-in class: no source file
            continue
        if path.is_file() and not path.is_relative_to(torch_dir) and (
                not path.is_relative_to(harness) or path.is_relative_to(methods_dir)):
            files[cls.__module__] = path
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return h.hexdigest()[:16] if files else ""


class Trainer:
    def __init__(self, data: DataBundle, config: Any, device: torch.device | str = "cpu",
                 ckpt_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                 share_dir: str | Path | None = None, share_salt: str = ""):
        """``share_dir``: a store of finished plain stages (see ``fit``) shared by the runs of one results
        folder; ``share_salt`` is mixed into their keys (the runner passes the harness's code hash and the
        data's fingerprint, so a stage is only reused by the same code on the same data)."""
        from ensemble_bench import distributed

        self.share_dir = Path(share_dir) if share_dir is not None else None
        self.share_salt = share_salt
        # torchrun / a multi-task Slurm job: one rank of a data-parallel run (ensemble_bench.distributed)
        self.device = distributed.init(torch.device(device))
        self.world_size = distributed.world_size() if distributed.active() else 1
        self.is_writer = distributed.rank() == 0   # rank 0 alone writes checkpoints and the stage store
        self.cuda = self.device.type == "cuda"
        self.data = data.to(self.device)
        self.config = config
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.channels_last = bool(getattr(config, "channels_last", False)) and self.cuda
        self.bf16 = bool(getattr(config, "bf16", False)) and self.cuda
        # torch.compile of the training forward (CUDA and CPU; on a CPU inductor builds C++ kernels, checked by
        # runner.check_compiler): the same computation with other floating-point rounding, as another
        # machine's; recorded (segments, training.compiled), not a row key, but in the stage-store key
        self.compiled = bool(getattr(config, "compile", False))
        self.normalizer = Normalizer(data.mean, data.std, self.device, self.channels_last)
        self.stages: dict[str, StageResult] = {}
        # the run's effective recipe: every stage's default (ensemble_bench.recipe)
        self.recipe: Recipe = (Recipe.from_dict(config.effective_recipe) if getattr(config, "effective_recipe", None)
                               else config.run_recipe())
        # (stage, its final optimiser state on the CPU) of the stage finished last, for optimizer_from
        self._last_opt: tuple[str, dict] | None = None

    # ------------------------------------------------------------------------------ helpers
    def autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def loader(self, split: Split | str = "train", *, batch_size: int | None = None, shuffle: bool = True,
               augment: bool = True, generator: torch.Generator | None = None) -> TensorLoader:
        if isinstance(split, str):
            split = getattr(self.data, split)
        return TensorLoader(split, batch_size or self.config.batch_size, self.normalizer, shuffle=shuffle,
                            augment=self.data.augment if augment else None, generator=generator)

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    @torch.inference_mode()
    def predict(self, model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Member logits [M, N, C] (float32, on CPU) of uint8 images ``x``, in eval mode. Evaluation runs
        in float32 (never under the bf16 autocast that training may use, nor as CUDA's TF32), so metrics do
        not depend on it."""
        from ensemble_bench.environment import exact_float32

        was_training = model.training
        model.eval()
        outs = []
        with exact_float32():
            for i in range(0, x.shape[0], batch_size):
                xb = self.normalizer(x[i:i + batch_size].to(self.device))
                out = model(xb)
                if out.dim() == 2:
                    out = out.unsqueeze(0)
                outs.append(out.float().cpu())
        model.train(was_training)
        return torch.cat(outs, dim=1)

    def val_metrics(self, model: nn.Module) -> dict[str, float]:
        """Validation accuracy and NLL of ``model`` (its members combined by its own rule), and the NLL's
        standard error over the validation images (``val_nll_se``: their per-image spread / sqrt(n))."""
        return self._validate(model)[0]

    def _validate(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        """``val_metrics`` and the per-image NLL [N] (float64) it averages: a stage keeps the vector of its
        last cycle end, so a later epoch's NLL can be compared with it image by image (``_train_epochs``)."""
        from ensemble_bench.metrics import accuracy, ensemble_log_probs, ensemble_probs

        logits = self.predict(model, self.data.val.x)
        y = self.data.val.y.cpu()
        combine = getattr(model, "combine", "probs")
        losses = -ensemble_log_probs(logits, combine).gather(1, y.long().unsqueeze(1)).squeeze(1)
        # the mean of ``losses`` is bitwise ``metrics.nll`` (the same reduction of the same vector; a test
        # checks it). Accuracy keeps p-bar as the test metrics compute it, so a near-tie breaks the same way.
        return ({"val_acc": float(accuracy(ensemble_probs(logits, combine), y)), "val_nll": float(losses.mean()),
                 "val_nll_se": _standard_error(losses)}, losses)

    def val_nll(self, model: nn.Module) -> float:
        return self.val_metrics(model)["val_nll"]

    # ---------------------------------------------------------------------------------- fit
    def fit(self, model: nn.Module, spec: Stage | None = None, /, **settings: Any) -> StageResult:
        """Train one stage (a ``Stage``, or its fields as keywords; ``stage=`` names it) and return its
        StageResult, whose ``history`` is the stage's learning curve. Every epoch ends with validation on
        the held-out split (``Stage``: what is validated and selected)."""
        if spec is None:
            spec = Stage(**{("name" if k == "stage" else k): (tuple(v) if k == "stateful" and v else v)
                            for k, v in settings.items() if not (k == "stateful" and v is None)})
        elif settings:
            raise TypeError("Trainer.fit takes a Stage or its settings as keywords, not both")
        r = spec.recipe if spec.recipe is not None else self.recipe
        if spec.epochs is not None:
            r = r.replace(epochs=int(spec.epochs))
        epochs = r.epochs
        if spec.select not in ("last", "best_val"):
            raise ValueError(f"select must be 'last' or 'best_val'; got {spec.select!r}")
        has_val = self.data.val is not None
        if spec.select == "best_val" and not has_val:
            self.log(f"[{spec.name}] no validation split (val_fraction=0): keeping the last epoch")
            spec = replace(spec, select="last")
        if spec.val_fn is not None and spec.select_metric == "val_nll":
            spec = replace(spec, select_metric="val")
        stage, seed, select, select_metric = spec.name, spec.seed, spec.select, spec.select_metric
        stateful, optimizer_from = list(spec.stateful), spec.optimizer_from
        higher_better = select_metric == "val_acc"
        model = self.prepare(model)
        opt = torch.optim.SGD(spec.params if spec.params is not None else model.parameters(), lr=r.lr,
                              momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay)
        stage_recipe = r.to_dict()
        groups = [{k: g[k] for k in ("name", "lr_scale", "weight_decay") if k in g} for g in opt.param_groups]
        if any("lr_scale" in g or "name" in g for g in groups):
            stage_recipe["param_groups"] = groups

        gen = torch.Generator().manual_seed(stable_seed(self.config.seed, stage) if seed is None else stable_seed(seed))
        result = StageResult(stage, epochs, recipe=stage_recipe, select=select,
                             select_metric=select_metric if select == "best_val" else None, converges=spec.converges)
        best_state = anchor = None
        start_epoch = 0
        distributed.barrier()   # every rank decides from the same files (rank 0's, finished)
        ckpt = self.ckpt_dir / f"{stage}.pt" if self.ckpt_dir is not None else None
        # A plain stage is fully determined by what its key hashes: a run that finds it finished in the
        # store (an earlier run of another ensemble size, or the single model whose weights are member 0)
        # loads it instead of training again.
        plain = spec.plain
        share = None
        if plain and self.share_dir is not None:
            # the key is taken from the initial weights, so a stage resumed from its own checkpoint (or
            # finished in an earlier process) is stored for the other runs too when it ends
            share = self.share_dir / f"{self._share_key(model, stage_recipe, seed, select, select_metric)}.pt"
            if share.is_file() and not (ckpt is not None and ckpt.is_file()):
                state = load_checkpoint(share, self.device)
                model.load_state_dict(state["model"])
                result = StageResult(**{**state["result"], "stage": stage})
                result.reused_from = state["origin"]
                self.stages[stage] = result
                self._last_opt = None
                self.log(f"[{stage}] the same stage was trained by {state['origin']}: reused, not trained again")
                return result
        if ckpt is not None and ckpt.is_file():
            state = load_checkpoint(ckpt, self.device)
            # hook objects first, the weights last: a hook's load may touch the weights (sparsity masks
            # re-applied), and the saved weights are the truth (a finished best_val stage saved the best
            # epoch's weights beside the last epoch's masks)
            for obj, st in zip(stateful, state.get("stateful", [])):
                obj.load_state_dict(st)
            model.load_state_dict(state["model"])
            result = StageResult(**state["result"])
            if state["done"]:
                self._last_opt = (stage, _to_cpu(state["opt"]))
                self.log(f"[{stage}] already trained ({result.epochs} epochs): loaded from checkpoint")
                self.stages[stage] = result
                self._store(share, model, result, stage)
                return result
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            if self.cuda and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"])
            best_state, anchor = state.get("best_state"), state.get("val_anchor")
            if anchor is not None:   # loaded onto the training device; validation losses live on the CPU
                anchor = (anchor[0], anchor[1].cpu())
            start_epoch = result.resumed_from_epoch = len(result.history)
            self.log(f"[{stage}] resuming after epoch {start_epoch}/{epochs}")
        elif optimizer_from is not None:
            if self._last_opt is None or self._last_opt[0] != optimizer_from:
                raise ValueError(f"stage {stage!r}: optimizer_from={optimizer_from!r} is not the stage this trainer "
                                 f"finished last")
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(self._last_opt[1]))
            for g, h in zip(opt.param_groups, hyper):   # this stage's own lr / momentum / weight decay
                g.update(h)

        if start_epoch < epochs:
            result.segments.append({"from_epoch": start_epoch, "device": self.device_label(),
                                    "precision": self.precision, **({"compiled": True} if self.compiled else {})})
        with distributed.data_parallel(model, self.device) as dp_model:
            self._train_epochs(model, dp_model, opt, r, result, gen, spec, epochs, start_epoch, has_val,
                               higher_better, best_state, ckpt, stateful, anchor)
        self.stages[stage] = result
        self._store(share, model, result, stage)
        return result

    def _store(self, share: Path | None, model: nn.Module, result: StageResult, stage: str) -> None:
        """A finished plain stage into the store (``share``: its key's file), unless it is there already."""
        if share is None or self.ckpt_dir is None or not self.is_writer or share.is_file():
            return
        self.share_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({"model": model.state_dict(), "result": asdict(result),
                            "origin": f"{self.ckpt_dir.name}/{stage}"}, share)

    def _train_epochs(self, model, dp_model, opt, r, result, gen, spec: Stage, epochs, start_epoch, has_val,
                      higher_better, best_state, ckpt, stateful, anchor) -> None:
        """The epochs of one stage (``fit``); ``dp_model`` is what the loss calls (``model`` itself on one
        process, its DistributedDataParallel wrapper on several ranks). ``anchor``: (epoch, per-image
        validation NLL) of the stage's last learning-rate cycle end so far (None before the first): every
        later epoch records the standard error of its NLL's difference from it, image by image, which the
        convergence rule reads for a schedule that restarts (``columns.stage_converged``)."""
        stage, split, loss_fn = spec.name, spec.split, spec.loss_fn or default_loss
        batch_transform, after_step, on_epoch_end = spec.batch_transform, spec.after_step, spec.on_epoch_end
        val_fn, val_model, select, select_metric = spec.val_fn, spec.val_model, spec.select, spec.select_metric
        ddp = dp_model is not model
        train_model = torch.compile(dp_model) if self.compiled else dp_model
        loader = self.loader(split or self.data.train, batch_size=r.batch_size, generator=gen)
        steps_per_epoch = len(loader)
        if steps_per_epoch < 1:
            raise ValueError(f"stage {stage!r}: the training split is empty")
        sample_x = None
        progress = bool(getattr(self.config, "progress", False)) and sys.stderr.isatty()
        check_every = 1 if not self.cuda else 25
        cur_lr = r.lr_at(start_epoch)

        def lr_end(k: int) -> float:   # the rate of epoch k's last step: what its curve entry records
            return r.lr_at(k + (steps_per_epoch - 1) / steps_per_epoch)
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=self.device)
            n_batches = 0
            batches = loader
            if progress:
                from tqdm import tqdm
                batches = tqdm(loader, total=steps_per_epoch, desc=f"{stage} {epoch + 1}/{epochs}", leave=False)
            for i, (x, y) in enumerate(batches):
                cur_lr = r.lr_at(epoch + i / steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = cur_lr * g.get("lr_scale", 1.0)
                if batch_transform is not None:
                    x, y = batch_transform(x, y)   # on the global batch (the same on every rank)
                if sample_x is None:
                    sample_x = x[:1].detach().clone()
                global_rows = int(x.shape[0])
                weight = 1.0
                if ddp:   # this rank's rows of the global batch; its loss weighted by its share
                    x, y, weight = distributed.shard(x, y)
                with self.autocast():
                    loss = loss_fn(train_model, x, y)
                    if ddp:
                        loss = loss * weight
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                result.steps += 1
                if after_step is not None:
                    after_step(model, result.steps)
                loss_sum += loss.detach().float()
                n_batches += 1
                result.samples_seen += global_rows   # the global batch: the same count as on one process
                if n_batches % check_every == 0 or i == steps_per_epoch - 1:
                    if not torch.isfinite(loss_sum):
                        raise TrainingDiverged(
                            f"training diverged: loss is {loss.item()} in stage {stage!r}, epoch {epoch + 1}, "
                            f"step {i + 1}; try a lower --lr (now {r.lr})")
            train_s = time.perf_counter() - t0
            if ddp:   # the mean over ranks of the weighted losses: the global batches' mean loss
                loss_sum = distributed.all_reduce_mean(loss_sum)
            entry: dict[str, Any] = {"epoch": epoch + 1, "lr": cur_lr, "loss": float(loss_sum) / max(n_batches, 1),
                                     "epoch_s": train_s}
            if has_val:
                t_val = time.perf_counter()
                if val_fn is not None:
                    v = val_fn(model)
                    entry.update(v if isinstance(v, dict) else {"val": float(v)})
                else:
                    metrics, losses = self._validate(val_model if val_model is not None else model)
                    entry.update(metrics)
                    if anchor is not None:   # the paired standard error of this epoch's NLL minus the last cycle end's
                        entry["val_nll_diff_se"] = _standard_error(losses - anchor[1])
                        entry["diff_from_epoch"] = anchor[0]
                    if 0 < epoch < epochs - 1 and is_cycle_end(lr_end(epoch - 1), cur_lr, lr_end(epoch + 1)):
                        anchor = (epoch + 1, losses)
                entry["val_s"] = time.perf_counter() - t_val
                if select == "best_val":
                    v = entry[select_metric]
                    better = result.best_val is None or (v > result.best_val if higher_better else v < result.best_val)
                    if better:
                        result.best_val, result.best_epoch = v, epoch + 1
                        best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
            if on_epoch_end is not None:
                on_epoch_end(model, epoch + 1)
            result.train_s += train_s
            result.history.append(entry)
            done = epoch == epochs - 1
            if done:
                self._last_opt = (stage, _to_cpu(opt.state_dict()))
                if select == "best_val" and best_state is not None:
                    model.load_state_dict(best_state)
                with distributed.local_batchnorm(model):   # counted on this rank alone, no collectives
                    result.flops_per_sample = self._flops_per_sample(model, sample_x)
            vals = " ".join(f"{k} {entry[k]:.4f}" for k in ("val_acc", "val_nll", "val") if k in entry)
            self.log(f"[{stage}] epoch {epoch + 1}/{epochs} loss {entry['loss']:.4f} lr {cur_lr:.4g}"
                     + (f" {vals}" if vals else "") + f" {entry['epoch_s']:.1f}s")
            if ckpt is not None and self.is_writer:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                _atomic_torch_save({
                    "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if self.cuda else None,
                    "best_state": None if done else best_state, "result": asdict(result), "done": done,
                    "val_anchor": None if done else anchor,
                    "stateful": [obj.state_dict() for obj in stateful]}, ckpt)

    def _share_key(self, model: nn.Module, recipe: dict, seed: Any, select: str, select_metric: str) -> str:
        h = hashlib.sha256()
        h.update(repr((type(model).__qualname__, repr(model), sorted(recipe.items()), seed, self.config.seed
                       if seed is None else None, select, select_metric, self.device.type, self.bf16,
                       self.channels_last, self.compiled, self.share_salt,
                       model_code(model))
                      + ((("world_size", self.world_size),) if self.world_size > 1 else ())).encode())
        for k, t in sorted(model.state_dict().items()):
            h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                     else t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:24]

    @staticmethod
    def _flops_per_sample(model: nn.Module, sample_x: torch.Tensor | None) -> float | None:
        if sample_x is None:
            return None
        try:
            from ensemble_bench.cost import count_flops

            return float(count_flops(model, sample_x)["flops"])
        except Exception:  # training cost is an estimate: never fail a finished stage over it
            return None

    def device_label(self) -> str:
        """The device this trainer trains on, as records name it (``N x <device>`` under data parallelism)."""
        from ensemble_bench.cost import device_name

        name = device_name(self.device)
        return f"{self.world_size} x {name}" if self.world_size > 1 else name

    def device_epochs(self) -> dict[str, int]:
        """Epochs trained on each device, over every stage this run holds (reused stages included: their
        time is in ``train_s`` too), in the order the devices were first used; from the stages' segments
        (a stage from a checkpoint or store written before segments were recorded counts nothing)."""
        out: dict[str, int] = {}
        for s in self.stages.values():
            ends = [seg["from_epoch"] for seg in s.segments[1:]] + [len(s.history)]
            for seg, end in zip(s.segments, ends):
                out[seg["device"]] = out.get(seg["device"], 0) + max(end - seg["from_epoch"], 0)
        return out

    def training_device(self) -> str:
        """The record's ``training.device``: this trainer's device, or, where some epochs of the run were
        trained elsewhere (a run resumed on another machine, a stage reused from the store or trained by a
        member task on another), every device joined by " + ", so that its ``train_s`` is never read as
        one device's time."""
        here = self.device_label()
        used = [d for d, n in self.device_epochs().items() if n > 0]
        return here if set(used) <= {here} else " + ".join(used)

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def training_precision(self) -> str:
        """The record's ``training.precision`` (a group key): this trainer's, or where the run's segments
        trained in more than one (a bf16 CUDA run resumed on a CPU), each " + "-joined in order."""
        used = list(dict.fromkeys(seg["precision"] for s in self.stages.values() for seg in s.segments
                                  if seg.get("precision")))
        return " + ".join(used) if len(used) > 1 else (used[0] if used else self.precision)

    def scale_out_summary(self) -> dict[str, Any]:
        """For the record of a data-parallel run: the world size and the training time per device (wall,
        as ``train_s``) and in total (device-seconds); its device, ``N x <device>``, is
        :meth:`training_device`'s."""
        if self.world_size <= 1:
            return {"world_size": 1}
        train_s = sum(s.train_s for s in self.stages.values())
        return {"world_size": self.world_size,
                "train_s_per_device": train_s, "train_device_s_total": train_s * self.world_size,
                "global_batch": self.recipe.batch_size,
                "batch_per_device": self.recipe.batch_size / self.world_size}

    def summary(self) -> dict[str, Any]:
        """Training cost, recipe and learning curve of every stage fitted by this trainer (for the record).
        A stage's ``recipe_changes`` lists the fields where it trained differently from the run's
        effective recipe (besides its length)."""
        from ensemble_bench.recipe import differences

        flops = [s.train_flops for s in self.stages.values()]
        run = self.recipe.to_dict()
        return {
            "train_s": sum(s.train_s for s in self.stages.values()),
            "precision": self.training_precision(),     # the arithmetic every stage trained in
            "compiled": any(seg.get("compiled", False) for s in self.stages.values() for seg in s.segments),
            "epochs_run": {k: len(s.history) for k, s in self.stages.items()},
            "device_epochs": self.device_epochs(),
            "samples_seen": sum(s.samples_seen for s in self.stages.values()),
            "train_flops": None if any(f is None for f in flops) or not flops else float(sum(flops)),
            "stages": {k: {"epochs": s.epochs, "steps": s.steps, "samples_seen": s.samples_seen,
                           "train_s": s.train_s, "best_epoch": s.best_epoch, "best_val": s.best_val,
                           "select": s.select, "select_metric": s.select_metric, "converges": s.converges,
                           "flops_per_sample": s.flops_per_sample,
                           "final_loss": s.history[-1]["loss"] if s.history else None,
                           "recipe": s.recipe, "reused_from": s.reused_from,
                           "recipe_changes": {f: v for f, v in differences(s.recipe, run).items() if f != "epochs"},
                           "segments": s.segments, "curve": s.history}
                       for k, s in self.stages.items()},
        }
