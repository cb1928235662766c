"""Run the reference sweep's pinned code (879fd50) with one fix applied at run time.

This file runs from the pinned worktree (README: it is copied to ../ref-sweep/results/reference/ with the
specs), in place of `python -m benchmark`: `python ../ref-sweep/results/reference/pinned.py sweep ...`.

At 879fd50 a plain stage resumed from its own checkpoint is not put into the stage store when it finishes
(main's train.py fixed it later), so the runs that share it (member k of DE-2/3/4, the single model) train it
again. This wrapper stores such a stage after it finishes, under the key a fresh run of the pinned code
computes (the model's initial weights, before the checkpoint is loaded), in the shape the pinned code
writes ({"model", "result", "origin"}). Nothing a record holds changes: the harness files on disk, and so
the records' code hash, stay those of 879fd50; training is deterministic, so a reused stage is bitwise the
stage that would have been trained again, and the reusing record names it (training.reused_stages).

The patch is at module level, so the sweep's spawned worker processes (which import this file as
__mp_main__) apply it too.
"""
import os
import sys
from dataclasses import asdict
from pathlib import Path

WORKTREE = Path(__file__).resolve().parents[2]          # ../ref-sweep: results/reference/pinned.py in it
sys.path.insert(0, str(WORKTREE))
from benchmark import train  # noqa: E402

_fit = train.Trainer.fit
_PLAIN_NONE = ("loss_fn", "batch_transform", "after_step", "params", "val_fn", "val_model", "on_epoch_end",
               "optimizer_from", "split")


def _fit_and_store(self, model, **kw):
    stage = kw.get("stage", "main")
    ckpt = self.ckpt_dir / f"{stage}.pt" if self.ckpt_dir is not None else None
    plain = all(kw.get(k) is None for k in _PLAIN_NONE) and not kw.get("stateful")
    share = None
    if plain and self.share_dir is not None and ckpt is not None and ckpt.is_file():
        # the key as the pinned fit computes it for a fresh stage (train.py lines 186-225 at 879fd50)
        r = kw.get("recipe") or self.recipe
        if kw.get("epochs") is not None:
            r = r.replace(epochs=int(kw["epochs"]))
        select = kw.get("select", "last")
        if select == "best_val" and self.data.val is None:
            select = "last"
        key = self._share_key(self.prepare(model), r.to_dict(), kw.get("seed"), select,
                              kw.get("select_metric", "val_nll"))
        share = self.share_dir / f"{key}.pt"
    result = _fit(self, model, **kw)
    if share is not None and not share.exists() and result.reused_from is None:
        self.share_dir.mkdir(parents=True, exist_ok=True)
        train._atomic_torch_save({"model": model.state_dict(), "result": asdict(result),
                                  "origin": f"{self.ckpt_dir.name}/{stage}"}, share)
        self.log(f"[{stage}] resumed stage finished: stored for reuse ({share.name})")
    return result


train.Trainer.fit = _fit_and_store

if __name__ == "__main__":
    os.chdir(WORKTREE)
    from benchmark.cli import main
    sys.exit(main(sys.argv[1:]))
