"""Mode connectivity: a curve theta(l), l in [0, 1], between two trained networks of one architecture.

Generic machinery (any ``nn.Module``; no method is named here), after Garipov et al. (NeurIPS 2018):

  bezier  theta(l) = (1-l)^2 theta_0 + 2 l (1-l) theta_c + l^2 theta_1   (quadratic Bezier curve)
  line    theta(l) = (1-l) theta_0 + l theta_1                            (the straight segment; nothing
                                                                            to train)

for EVERY parameter (conv, norm affine, linear). The endpoints theta_0, theta_1 are frozen copies (buffers
of the ``Curve``); only the control point theta_c (the parameters of ``Curve.net``, a freshly initialised
network of the same architecture) is trained. ``train_curve`` trains it with the shared Trainer: each
minibatch draws one l ~ U(0, 1) (from a checkpointed generator, so a resumed stage draws the same l's) and
takes cross-entropy at theta(l) (``torch.func.functional_call`` evaluates the template network at those
weights, so gradients flow to theta_c through the Bezier coefficient 2 l (1-l) and nowhere else).

Batch norm: the running statistics of a network depend on its weights, so a point strictly inside the
curve has no valid statistics. ``Curve.point(l, batches)`` returns a plain network at theta(l) whose
statistics are recomputed by a pass over training batches in train mode after a reset (cumulative
average, momentum None). The endpoints (l = 0, 1) keep their own networks' statistics, so the curve
reproduces both endpoint networks exactly; evaluating an interior point in eval mode without recomputing
is refused rather than silently using stale statistics.
"""
from __future__ import annotations

import copy
import random
from typing import Any, Iterable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

CURVES = ("bezier", "line")


def coefficients(kind: str, l: Any) -> tuple[Any, Any, Any]:
    """(c_0, c_control, c_1) of theta(l) = c_0 theta_0 + c_control theta_c + c_1 theta_1."""
    if kind == "bezier":
        return (1 - l) ** 2, 2 * l * (1 - l), l ** 2
    if kind == "line":
        return 1 - l, 0 * l, l
    raise ValueError(f"unknown curve {kind!r}; choose from {', '.join(CURVES)}")


def has_running_stats(net: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in net.modules())


@torch.no_grad()
def recompute_bn(net: nn.Module, batches: Iterable) -> nn.Module:
    """Reset every batch-norm layer's running statistics and re-estimate them as the plain average over
    ``batches`` (tensors, or (x, y, ...) tuples whose first entry is the input), forward in train mode.
    Returns ``net`` in eval mode."""
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return net.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative moving average: every batch counts the same
    net.train()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            net(x)
            seen += int(x.shape[0])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    if seen == 0:
        raise ValueError("recompute_bn: no batches to estimate batch-norm statistics from")
    return net.eval()


def _is_endpoint(l: Any) -> int | None:
    v = float(l)
    return 0 if v == 0.0 else 1 if v == 1.0 else None


class Curve(nn.Module):
    """theta(l) between ``end0`` and ``end1`` (trained networks, copied and frozen), with the control
    point held by ``net`` (a network of the same architecture; its own initialisation is theta_c's).

    ``forward(x, l)`` evaluates the network at theta(l). In train mode batch norm uses batch statistics
    (as in curve training); in eval mode only the endpoints are allowed (their own statistics): an
    interior point needs ``point(l, batches)``."""

    def __init__(self, net: nn.Module, end0: nn.Module, end1: nn.Module, kind: str = "bezier"):
        super().__init__()
        coefficients(kind, 0.0)    # validates ``kind``
        self.kind = kind
        self.net = net
        self._pnames = [n for n, _ in net.named_parameters()]
        self._bnames = [n for n, _ in net.named_buffers()]
        for tag, end in (("0", end0), ("1", end1)):
            params = dict(end.named_parameters())
            buffers = dict(end.named_buffers())
            if sorted(params) != sorted(self._pnames) or sorted(buffers) != sorted(self._bnames):
                raise ValueError("curve endpoints must have the architecture of the control network")
            for i, n in enumerate(self._pnames):
                if params[n].shape != dict(net.named_parameters())[n].shape:
                    raise ValueError(f"curve endpoint {tag}: parameter {n} has shape {tuple(params[n].shape)}")
                self.register_buffer(f"end{tag}_p{i}", params[n].detach().clone())
            for i, n in enumerate(self._bnames):
                self.register_buffer(f"end{tag}_b{i}", buffers[n].detach().clone())
        if kind == "line":
            net.requires_grad_(False)   # the straight segment has no control point
        self._has_bn = has_running_stats(net)

    # ----------------------------------------------------------------------------------- weights
    def control_parameters(self) -> list[nn.Parameter]:
        """What curve training optimises: theta_c (empty for the straight line)."""
        return [] if self.kind == "line" else list(self.net.parameters())

    def endpoint(self, k: int) -> dict[str, torch.Tensor]:
        """theta_k (k = 0, 1) with its batch-norm buffers, by parameter/buffer name."""
        d = {n: getattr(self, f"end{k}_p{i}") for i, n in enumerate(self._pnames)}
        d.update({n: getattr(self, f"end{k}_b{i}") for i, n in enumerate(self._bnames)})
        return d

    def weights(self, l: Any) -> dict[str, torch.Tensor]:
        """theta(l) for every parameter; differentiable with respect to theta_c."""
        a, b, c = coefficients(self.kind, l)
        control = dict(self.net.named_parameters())
        out = {}
        for i, n in enumerate(self._pnames):
            w = a * getattr(self, f"end0_p{i}") + c * getattr(self, f"end1_p{i}")
            if self.kind == "bezier":
                w = w + b * control[n]
            out[n] = w
        return out

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, l: Any = 0.0) -> torch.Tensor:
        params = self.weights(l)
        if self.training:
            # batch statistics; running buffers of the template net absorb the updates (never used)
            return functional_call(self.net, params, (x,))
        k = _is_endpoint(l)
        if k is not None:
            state = self.endpoint(k)
            state.update(params)
            return functional_call(self.net, state, (x,))
        if self._has_bn:
            raise RuntimeError(f"the curve at l={float(l):g} has no batch-norm statistics: evaluate it through "
                               "Curve.point(l, batches), which recomputes them at that point")
        return functional_call(self.net, params, (x,))

    @torch.no_grad()
    def point(self, l: float, batches: Iterable | None = None) -> nn.Module:
        """A standalone network at theta(l) in eval mode, frozen. Endpoints keep their own statistics;
        an interior point of a network with batch norm needs ``batches`` (training data) to recompute
        them."""
        net = copy.deepcopy(self.net)
        state = {n: t.detach().clone() for n, t in self.weights(float(l)).items()}
        k = _is_endpoint(l)
        if k is not None:
            state.update({n: t.clone() for n, t in self.endpoint(k).items() if n in self._bnames})
        net.load_state_dict(state, strict=k is not None)
        net.requires_grad_(False)
        if k is None and has_running_stats(net):
            if batches is None:
                raise ValueError(f"the curve point l={l:g} needs batches of training data to recompute its "
                                 "batch-norm statistics")
            recompute_bn(net, batches)
        return net.eval()


# ------------------------------------------------------------------------------------------ training
class UniformSampler:
    """l ~ U(0, 1), one per minibatch, from a generator whose state rides in the stage checkpoint."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self) -> float:
        return self.rng.random()

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, s: dict) -> None:
        self.rng.setstate(s["rng"])


def curve_loss(sampler: UniformSampler):
    """loss_fn(curve, x, y): cross-entropy at theta(l), one fresh l per call (= per minibatch)."""

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        l = torch.tensor(sampler(), device=x.device)
        return nn.functional.cross_entropy(model(x, l).float(), y)

    return loss


def train_curve(trainer: Any, curve: Curve, *, stage: str, epochs: int, seed: Any, **fit_kw: Any):
    """Train the control point with the shared Trainer (its recipe unless ``fit_kw`` overrides it).
    Returns the StageResult, or None for a curve with nothing to train (the straight line).

    The stage's learning curve has the training loss only: validating an interior point of the curve
    needs its batch-norm statistics recomputed over the training split, a third of an epoch's cost, so
    it is done once, for the midpoint, after the stage (the method records it)."""
    if not curve.control_parameters():
        return None
    from ensemble_bench.train import stable_seed

    sampler = UniformSampler(stable_seed("curve-l", seed))
    return trainer.fit(curve, stage=stage, epochs=epochs, loss_fn=curve_loss(sampler),
                       params=curve.control_parameters(), stateful=[sampler], seed=seed,
                       val_fn=lambda _: {}, **fit_kw)
