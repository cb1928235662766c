"""Sparse training, method-agnostic: weight masks, ERK initial densities and dynamic sparse training.

What is sparse: the ``weight`` of every convolution and linear layer (the first conv, 1x1 shortcut convs
and the classifier included). Biases and normalisation parameters stay dense.

Initial masks (``erk_densities``): Erdos-Renyi-Kernel. The density of a layer with weight shape
``(n_out, n_in, k_h, k_w)`` (or ``(n_out, n_in)``) is ``eps * sum(shape) / prod(shape)``; ``eps`` is
solved so that the global density (live weights / all masked weights) equals the target. A layer whose
density would exceed 1 is made dense and ``eps`` is solved again for the others. Inside a layer the live
positions are drawn uniformly at random.

``DynamicSparsity`` keeps the masks of one network and changes its topology while it trains:
  * masks are re-applied after every optimiser step (pruned weights stay exactly 0). The released
    FreeTickets code leaves the optimiser's momentum buffers alone (a pruned position keeps its momentum,
    and a regrown one starts from it): that is the default. ``zero_momentum=True`` also zeroes the momentum
    of pruned and regrown positions, so a weight never comes back with stale momentum;
  * every ``update_frequency`` iterations, in every layer: drop the ``ceil(p * n_active)`` live weights
    of smallest magnitude (p = death rate), then grow as many positions, among those inactive after the
    drop (the just-dropped ones included), with the largest magnitude of the dense gradient of the last
    minibatch. Grown weights start at exactly 0 (a just-dropped position grown again starts from 0 too, as
    in the released FreeTickets code). The number of live weights per layer is
    constant; a dense layer (ERK density 1) has nothing to explore and is left alone;
  * ``schedule_jump(q)`` asks for a one-off global exploration jump (drop a fraction q of every layer's
    live weights, regrow as many by gradient) after the next optimiser step.

The gradient used for growth is the dense gradient: nothing masks ``.grad``; the optimiser's update of
pruned positions is simply undone by the mask after each step. It must be read after ``backward`` and
before the next ``zero_grad``, which is where ``Trainer.fit`` calls ``after_step``.

Use with the Trainer::

    sparsity = DynamicSparsity(net, density=0.2, death_rate=0.5, update_frequency=1000, seed=s)
    with sparsity.attached():           # masks applied inside every optimizer.step() of net's params
        trainer.fit(net, after_step=sparsity.after_step, stateful=[sparsity])

``attached`` registers a post-step hook on ``torch.optim`` (PyTorch's global optimiser hook; it acts
only on optimisers that hold this network's masked weights) so the masks and momentum buffers are
handled whatever loop steps the optimiser. The masks and counters are state (``state_dict``), so a run
resumed from a checkpoint continues with exactly the same topology.

Dense kernels do not skip zeros: a masked network runs as fast as the dense one. Its cost in FLOPs is
counted per layer (``layer_density``; ensemble_bench.cost counts non-zero weights per layer).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import torch
from torch import nn

MASKED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def maskable_layers(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{qualified module name: weight}`` of every conv / linear layer (a shared weight once)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, MASKED_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter):
            if id(m.weight) in seen:
                continue
            seen.add(id(m.weight))
            out[name] = m.weight
    return out


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """ERK density of every layer (weight shapes by name) for the global target ``density``.

    density_l = eps * sum(shape_l) / prod(shape_l), with eps such that
    sum_l density_l * numel_l = density * sum_l numel_l; layers whose density would exceed 1 are set to 1
    and eps is solved again for the remaining layers (repeated until none exceeds 1)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    if not shapes:
        raise ValueError("no layers to make sparse")
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / numel[k] for k, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    eps = 0.0
    while True:
        rest = [k for k in shapes if k not in dense]
        if not rest:
            break
        budget = density * total - sum(numel[k] for k in dense)
        eps = budget / sum(raw[k] * numel[k] for k in rest)
        over = {k for k in rest if raw[k] * eps > 1.0}
        if not over:
            break
        # eps only grows when layers above 1 are removed, so every layer above 1 now stays above 1
        dense |= over
    return {k: 1.0 if k in dense else min(raw[k] * eps, 1.0) for k in shapes}


def random_mask(shape: tuple[int, ...], n_active: int, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask of ``shape`` with ``n_active`` uniformly random True positions."""
    n = math.prod(shape)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:n_active]] = True
    return flat.view(shape)


class DynamicSparsity:
    """Masks of one network (ERK at ``density``) and its dynamic-sparse-training topology updates.

    death_rate        fraction p of live weights dropped (and regrown) per layer at every update
    update_frequency  iterations between updates (counted over every ``after_step`` call, across stages);
                      0 switches the regular updates off (static sparse training)
    seed              seeds the random positions of the initial masks
    zero_momentum     also zero the momentum buffers of pruned and regrown positions (the released code
                      does not)
    """

    def __init__(self, model: nn.Module, density: float, *, death_rate: float = 0.5,
                 update_frequency: int = 1000, seed: int = 0, zero_momentum: bool = False):
        self.zero_momentum = bool(zero_momentum)
        if not 0.0 < death_rate <= 1.0:
            raise ValueError(f"death_rate must be in (0, 1]; got {death_rate}")
        if update_frequency < 0:
            raise ValueError(f"update_frequency must be >= 0; got {update_frequency}")
        self.layers = maskable_layers(model)
        self.density = float(density)
        self.death_rate = float(death_rate)
        self.update_frequency = int(update_frequency)
        self.target_density = erk_densities({k: tuple(w.shape) for k, w in self.layers.items()}, density)
        gen = torch.Generator().manual_seed(int(seed))
        self.masks: dict[str, torch.Tensor] = {}
        for name, w in self.layers.items():
            n = w.numel()
            k = min(max(int(round(self.target_density[name] * n)), 1), n)
            self.masks[name] = random_mask(tuple(w.shape), k, gen).to(w.device)
        self.steps = 0                      # iterations seen by after_step
        self.pending_jump: float | None = None
        self.events: list[dict[str, Any]] = []   # one entry per topology update
        self._optimizer: torch.optim.Optimizer | None = None
        self.apply()

    # ------------------------------------------------------------------------------ masks
    def _mask(self, name: str) -> torch.Tensor:
        m, w = self.masks[name], self.layers[name]
        if m.device != w.device:
            m = self.masks[name] = m.to(w.device)
        return m

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights (and their momentum buffers in ``optimizer``)."""
        for name, w in self.layers.items():
            off = ~self._mask(name)
            w.masked_fill_(off, 0.0)
            if optimizer is not None and self.zero_momentum:
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(off, 0.0)

    def active_counts(self) -> dict[str, int]:
        return {k: int(m.sum()) for k, m in self.masks.items()}

    def layer_density(self) -> dict[str, float]:
        """Live-weight fraction of every masked layer (by module name), from the masks."""
        return {k: int(m.sum()) / m.numel() for k, m in self.masks.items()}

    def global_density(self) -> float:
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    # ------------------------------------------------------------------------------ training hooks
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self._optimizer:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not any(id(w) in held for w in self.layers.values()):
                return                      # another network's optimiser
            self._optimizer = optimizer     # the optimiser of the stage being trained
        self.apply(optimizer)

    @contextlib.contextmanager
    def attached(self) -> Iterator["DynamicSparsity"]:
        """While open, every optimiser step over these weights is followed by the masks."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(self._post_step)
        try:
            yield self
        finally:
            handle.remove()
            self._optimizer = None

    def after_step(self, model: nn.Module | None = None, step: int | None = None) -> None:
        """Trainer hook, called after every optimiser step with the gradients still present: count the
        iteration, run a pending jump or a regular update when one is due."""
        if self._optimizer is None:
            raise RuntimeError("DynamicSparsity.after_step ran without an optimiser step over the masked "
                               "weights: train inside `with sparsity.attached():`")
        self.steps += 1
        if self.pending_jump is not None:
            q, self.pending_jump = self.pending_jump, None
            self.update(q, kind="jump")
        elif self.update_frequency > 0 and self.steps % self.update_frequency == 0:
            self.update(self.death_rate, kind="update")

    def schedule_jump(self, fraction: float) -> None:
        """A global exploration jump of ``fraction`` of every layer's live weights after the next step."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"jump fraction must be in (0, 1]; got {fraction}")
        self.pending_jump = float(fraction)

    # ------------------------------------------------------------------------------ topology update
    @torch.no_grad()
    def update(self, rate: float, kind: str = "update") -> dict[str, Any]:
        """Drop ``ceil(rate * n_active)`` smallest-magnitude live weights per layer and grow as many
        inactive positions with the largest |dense gradient| (``.grad`` of the last minibatch).
        Returns the event: ``changed`` (fraction of the sparse layers' live weights that left) and
        ``per_layer`` ({layer: fraction of its live weights that left}, sparse layers only)."""
        changed = 0
        active_total = 0
        per_layer: dict[str, float] = {}
        for name, w in self.layers.items():
            if w.grad is None:
                raise RuntimeError(f"no gradient on {name}.weight: a topology update needs the dense gradient "
                                   "of the last minibatch (run it after backward, before zero_grad)")
            mask = self._mask(name)
            flat = mask.reshape(-1)
            n_active = int(flat.sum())
            # a dense layer has no position to explore: nothing to drop or grow
            k = min(math.ceil(rate * n_active), n_active) if n_active < flat.numel() else 0
            if k == 0:
                continue
            active_total += n_active
            mag = w.detach().reshape(-1).abs().float().masked_fill(~flat, float("inf"))
            drop = torch.topk(mag, k, largest=False).indices
            new = flat.clone()
            new[drop] = False
            # candidates: every position inactive after the drop (the just-dropped ones included)
            grad = w.grad.detach().reshape(-1).abs().float().masked_fill(new, -1.0)
            grow = torch.topk(grad, k, largest=True).indices
            new[grow] = True
            grown = torch.zeros_like(flat)
            grown[grow] = True
            grown = grown.view_as(mask)
            self.masks[name] = new.view_as(mask)
            w.masked_fill_(grown, 0.0)          # grown connections start at exactly 0
            if self._optimizer is not None and self.zero_momentum:
                buf = self._optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(grown, 0.0)
            n_left = int((flat & ~new).sum())   # old live positions no longer live
            changed += n_left
            per_layer[name] = n_left / n_active
        self.apply(self._optimizer)
        # changed: fraction of the live weights of the sparse layers that moved elsewhere
        event: dict[str, Any] = {"step": self.steps, "kind": kind, "rate": float(rate),
                                 "changed": changed / max(active_total, 1)}
        if kind != "update":      # jumps are few: keep their per-layer picture
            event["per_layer"] = dict(per_layer)
        self.events.append(event)
        return {**event, "per_layer": per_layer}

    # ------------------------------------------------------------------------------ state
    def num_updates(self, kind: str | None = None) -> int:
        return sum(1 for e in self.events if kind is None or e["kind"] == kind)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: m.detach().cpu().clone() for k, m in self.masks.items()}, "steps": self.steps,
                "pending_jump": self.pending_jump, "events": copy.deepcopy(self.events),
                "density": self.density}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["masks"]) != set(self.masks):
            raise ValueError("sparsity state does not match this network's layers")
        for k, m in state["masks"].items():
            if tuple(m.shape) != tuple(self.layers[k].shape):
                raise ValueError(f"mask of {k} has shape {tuple(m.shape)}, weight {tuple(self.layers[k].shape)}")
            self.masks[k] = m.to(device=self.layers[k].device, dtype=torch.bool)
        self.steps = int(state["steps"])
        self.pending_jump = state["pending_jump"]
        self.events = copy.deepcopy(state["events"])
        self.apply(self._optimizer)

    def summary(self) -> dict[str, Any]:
        """Facts for a run record."""
        upd = [e["changed"] for e in self.events if e["kind"] == "update"]
        return {"density": self.global_density(), "iterations": self.steps,
                "updates": len(upd), "jumps": self.num_updates("jump"),
                "mean_update_changed": sum(upd) / len(upd) if upd else None,
                "jump_steps": [e["step"] for e in self.events if e["kind"] == "jump"],
                "jump_changed": [round(e["changed"], 4) for e in self.events if e["kind"] == "jump"],
                "dense_layers": sorted(k for k, m in self.masks.items() if bool(m.all()))}
