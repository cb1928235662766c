"""BatchEnsemble (Wen, Tran & Ba, ICLR 2020: "BatchEnsemble: an Alternative Approach to Efficient Ensemble
and Lifelong Learning").

Every conv and linear layer of the backbone holds ONE shared ("slow") weight W and, per member i, two
rank-1 "fast" vectors r_i (one entry per input channel) and s_i (one per output channel): member i's
weight is W_i = W o (s_i r_i^T). It is computed without forming W_i, as in the released layers
(edward2 ``Conv2DBatchEnsemble`` / ``DenseBatchEnsemble``): the input is scaled by r_i channel-wise, goes
through the shared layer, and the output is scaled by s_i; a layer with a bias gets one bias per member
(added after the scaling). Batch norm is shared by the members (one set of affine parameters and running
statistics, computed over the whole tiled batch), as in the released WRN (``wide_resnet_batchensemble``
builds plain ``BatchNormalization``).

Built for every suite backbone (each ``StagedNet``) through ``BatchEnsembleLayers``, a subclass of the
layer factory ``ensemble_bench.layers.Layers`` that every backbone is written against, so no backbone is
copied: the factory wraps each conv it builds (stem, block convs, projection shortcuts) and the head.
timm backbones are plain modules that are not built from the factory: ``UsageError``.

Choices, with their sources (uncertainty-baselines ``baselines/cifar/batchensemble.py`` and
``uncertainty_baselines/models/wide_resnet_batchensemble.py``, edward2 ``layers/convolutional.py``; where
the paper and the released code differ we follow the code):

* Members and the batch. The input is tiled M times at training AND test time (``tf.tile(images, [M, 1,
  1, 1])`` in both steps of the script): rows k*B:(k+1)*B of the tiled batch go to member k, so every
  member sees every image. The script sets its unique batch to ``per_core_batch_size // ensemble_size``
  per core (64 // 4 * 8 cores = 128 unique images, 512 rows a step) and its lr to 0.1 * 128 / 128; its
  optimiser steps per epoch are ``num_examples // 128``, those of the single model. Here the trainer's
  batch of ``batch_size`` (128) images is the unique batch and the model tiles it inside ``forward``: an
  epoch has exactly the single model's ceil(N / batch_size) steps, each of M * batch_size rows, and the
  run's lr applies to that step, as in the script. The trainer counts unique images in
  ``samples_seen`` and the FLOPs of the whole (M-row) forward per image, so the recorded training cost is
  the M x cost of one step.
* Loss: the mean cross-entropy over all M * B rows (``reduce_mean`` over the tiled batch in the script),
  i.e. the average of the members' losses.
* Fast-weight initialisation: the script's ``random_sign_init = -0.5``. In the released model
  (``make_sign_initializer``) a value v > 0 means edward2's ``RandomSign(v)``: each entry is +1 with
  probability v and -1 otherwise; v <= 0 means ``RandomNormal(mean=1, stddev=-v)``. So the default draws
  every r and s entry from N(1, 0.5^2) (standard deviation 0.5; v = 0 gives all ones). Per-member biases
  start at zero (edward2's ``bias_initializer='zeros'``). The slow weights keep the backbone's own
  initialisation, drawn exactly as the ``single`` model of the same seed draws them (the fast weights
  come from their own generator afterwards), so with all fast weights at 1 the network IS that model.
  (The released WRN initialises kernels with he_normal; every method in this suite keeps the backbone's
  initialisation.)
* Learning rate of the fast weights: the script multiplies the gradient of every variable whose name
  contains neither ``batch_norm`` nor ``kernel`` by ``fast_weight_lr_multiplier`` = 0.5, i.e. the fast
  weights r, s AND the per-member biases. With SGD + momentum that is the same as a 0.5 x learning rate
  for those parameters (the weight-decay term included, since the L2 penalty is part of the scaled
  gradient). Here: parameter groups ``slow`` (shared kernels and batch norm, lr x 1), ``fast_weights``
  (r, s: lr x 0.5) and ``member_biases`` (lr x 0.5); the trainer records the groups in the stage recipe.
* Weight decay: the released model puts its L2 penalty on the shared kernels, the batch-norm gamma and
  beta and the head's (per-member) bias, never on the fast weights (no alpha/gamma regularizer). Here:
  the recipe's weight decay on ``slow`` and ``member_biases``, 0 on ``fast_weights``.
* Prediction: member logits [M, B, C] from one forward of the tiled batch; the harness averages member
  probabilities (the script averages probabilities too). Inference FLOPs are M x the backbone's.

Recipe. ``--recipe shared`` (default): the run's recipe (as above). ``--recipe paper`` (``paper_recipe``):
the released CIFAR script (WRN-28-10, 250 epochs): SGD with Nesterov momentum 0.9, lr 0.1 per 128 unique
images (scaled linearly with ``batch_size`` as the script does), 1 warm-up epoch of 250 (scaled:
E / 250), lr x 0.2 at epochs 80, 160, 180 of 200 scaled to 250 (100, 200, 225 = 40 %, 80 %, 90 %), and
weight decay 6e-4: the script adds ``l2 * sum(w**2)`` with l2 = 3e-4 to the loss, whose gradient is
``2 * l2 * w``. (The paper's own CIFAR runs used ResNet-32x4 for 375 epochs, as the uncertainty-baselines
CIFAR README's related-results table lists them; the run keeps its E either way.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ensemble_bench.api import EnsembleModel, FitContext, Method, member_cross_entropy
from ensemble_bench.errors import UsageError
from ensemble_bench.layers import Layers
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register



# ------------------------------------------------------------------------------------------ layers
def _rows(v: torch.Tensor, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Per-member vectors v [M, C] as per-row vectors [rows, C] for a member-major batch of ``rows`` rows
    (rows k*B:(k+1)*B belong to member k), in ``like``'s dtype."""
    m = v.shape[0]
    if rows % m:
        raise ValueError(f"BatchEnsemble layer: {rows} rows do not split into {m} members "
                         f"(the input must be tiled M times)")
    return v.to(like.dtype).repeat_interleave(rows // m, dim=0)


class BatchEnsembleConv2d(nn.Module):
    """A shared conv (``conv``, no bias) with per-member rank-1 fast weights: input channels scaled by
    ``r[i]``, output channels by ``s[i]``, plus ``bias[i]`` when the layer has a bias. Input rows are
    member-major: rows k*B:(k+1)*B belong to member k. (The scaling broadcasts [rows, C, 1, 1] over the
    4-d tensors, so a channels-last input stays channels-last.)"""

    def __init__(self, conv: nn.Conv2d, members: int, bias: bool):
        super().__init__()
        if conv.bias is not None:
            raise ValueError("the shared conv of a BatchEnsemble layer has no bias (biases are per member)")
        self.conv = conv
        self.members = int(members)
        dev = conv.weight.device
        self.r = nn.Parameter(torch.ones(members, conv.in_channels, device=dev))
        self.s = nn.Parameter(torch.ones(members, conv.out_channels, device=dev))
        self.bias = nn.Parameter(torch.zeros(members, conv.out_channels, device=dev)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self.conv(x * _rows(self.r, n, x)[:, :, None, None])
        y = y * _rows(self.s, n, y)[:, :, None, None]
        if self.bias is not None:
            y = y + _rows(self.bias, n, y)[:, :, None, None]
        return y


class BatchEnsembleLinear(nn.Module):
    """The linear counterpart of ``BatchEnsembleConv2d`` (edward2 ``DenseBatchEnsemble``)."""

    def __init__(self, linear: nn.Linear, members: int, bias: bool):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("the shared linear of a BatchEnsemble layer has no bias (biases are per member)")
        self.linear = linear
        self.members = int(members)
        dev = linear.weight.device
        self.r = nn.Parameter(torch.ones(members, linear.in_features, device=dev))
        self.s = nn.Parameter(torch.ones(members, linear.out_features, device=dev))
        self.bias = nn.Parameter(torch.zeros(members, linear.out_features, device=dev)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self.linear(x * _rows(self.r, n, x))
        y = y * _rows(self.s, n, y)
        if self.bias is not None:
            y = y + _rows(self.bias, n, y)
        return y


BE_LAYERS = (BatchEnsembleConv2d, BatchEnsembleLinear)


class BatchEnsembleLayers(Layers):
    """The suite's layer factory with every conv and the head made BatchEnsemble layers of ``members``.

    The shared layer is built by the plain factory exactly as the plain backbone builds it (same
    arguments, same draws from the global RNG, in the same order: a biased layer draws its bias too, then
    drops it), so a backbone built with this factory under a seed has the slow weights of the plain
    backbone built under that seed. The fast weights start at 1 here; ``init_fast_weights`` draws them."""

    def __init__(self, members: int):
        if members < 1:
            raise ValueError("members must be >= 1")
        self.members = int(members)

    def conv(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int | None = None,
             bias: bool = False, role: str = "hidden") -> nn.Module:
        plain = super().conv(cin, cout, kernel_size, stride, padding, bias=bias, role=role)
        plain.bias = None                                  # (drawn, as the plain network draws it; unused)
        return BatchEnsembleConv2d(plain, self.members, bias=bias)

    def head(self, cin: int, num_classes: int) -> nn.Module:
        plain = super().head(cin, num_classes)
        has_bias = plain.bias is not None
        plain.bias = None
        return BatchEnsembleLinear(plain, self.members, bias=has_bias)


def be_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every BatchEnsemble layer of ``net``, in module order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, BE_LAYERS)]


def init_fast_weights(net: nn.Module, random_sign_init: float, seed: int) -> None:
    """Draw every r and s as the released code's ``make_sign_initializer(random_sign_init)`` does:
    v > 0: +1 with probability v, else -1 (edward2 ``RandomSign``); v <= 0: N(1, (-v)^2). Drawn on the CPU
    from a generator of its own, layer by layer in module order (r before s), then copied in."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, layer in be_layers(net):
            for p in (layer.r, layer.s):
                if random_sign_init > 0:
                    draw = torch.where(torch.rand(p.shape, generator=gen) < random_sign_init, 1.0, -1.0)
                else:
                    draw = 1.0 + (-random_sign_init) * torch.randn(p.shape, generator=gen)
                if not p.is_meta:
                    p.copy_(draw.to(p.device, p.dtype))


def parameter_groups(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters by role: ``fast_weights`` (every r and s), ``member_biases`` (the per-member biases)
    and ``slow`` (everything else: shared kernels, batch norm)."""
    fast, biases = [], []
    for _, layer in be_layers(net):
        fast += [layer.r, layer.s]
        if layer.bias is not None:
            biases.append(layer.bias)
    special = {id(p) for p in fast + biases}
    slow = [p for p in net.parameters() if id(p) not in special]
    return {"slow": slow, "fast_weights": fast, "member_biases": biases}


# ------------------------------------------------------------------------------------------ model
class BatchEnsembleModel(EnsembleModel):
    """``forward(x)``: x tiled M times (member-major, ``tf.tile(x, [M, 1, 1, 1])``), one pass of the
    BatchEnsemble network over the M * B rows, logits read as [M, B, C]. Used for training too."""

    def __init__(self, net: nn.Module, members: int, num_classes: int):
        super().__init__(members)
        self.net = net
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = self.net(x.repeat(self.num_members, *([1] * (x.dim() - 1))))
        return out.view(self.num_members, b, self.num_classes)


def batch_ensemble_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all M x B rows of the tiled batch (the script's ``reduce_mean``)."""
    return member_cross_entropy(model(x), y, "mean")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@register("batch_ensemble")
class BatchEnsemble(Method):
    staged_backbone = "rebuilds every conv and linear layer with rank-1 fast weights"
    summary = "BatchEnsemble: one shared weight per layer + per-member rank-1 fast weights, input tiled M times"

    @dataclass
    class Config:
        num_members: int = 4                   # M (the script's ensemble_size)
        random_sign_init: float = -0.5         # > 0: random signs, P(+1) = v; <= 0: N(1, (-v)^2)
        fast_weight_lr_multiplier: float = 0.5  # lr scale of the fast weights and per-member biases

        def __post_init__(self):
            if isinstance(self.num_members, bool) or not isinstance(self.num_members, int) or self.num_members < 1:
                raise ValueError(f"num_members must be an integer >= 1; got {self.num_members!r}")
            if not _is_number(self.random_sign_init) or self.random_sign_init > 1:
                raise ValueError(f"random_sign_init must be a finite number <= 1 (> 0: probability of +1; "
                                 f"<= 0: minus the std of N(1, std^2)); got {self.random_sign_init!r}")
            if not _is_number(self.fast_weight_lr_multiplier) or self.fast_weight_lr_multiplier <= 0:
                raise ValueError(f"fast_weight_lr_multiplier must be a finite number > 0; "
                                 f"got {self.fast_weight_lr_multiplier!r}")

    @classmethod
    def paper_recipe(cls, run, backbone):
        """uncertainty-baselines ``baselines/cifar/batchensemble.py`` (see the module docstring), scaled to
        the run's epochs and batch size."""
        return run.replace(lr=0.1 * run.batch_size / 128, momentum=0.9, nesterov=True, weight_decay=6e-4,
                           schedule="multistep", milestones=(0.4, 0.8, 0.9), lr_decay=0.2,
                           warmup_epochs=run.epochs / 250)

    def build(self, ctx: FitContext) -> EnsembleModel:
        o = self.options
        ctx.require_staged_backbone(self.staged_backbone)
        net = ctx.make_backbone(layers=BatchEnsembleLayers(o.num_members), seed=ctx.member_seed(0))
        if not be_layers(net):
            raise UsageError(f"batch_ensemble found no conv or linear layer built by its layer factory in "
                             f"{ctx.backbone_name!r}")
        init_fast_weights(net, o.random_sign_init, stable_seed(ctx.seed, "batch_ensemble", "fast_weights"))
        layers = be_layers(net)
        ctx.info.update({
            "batch_ensemble_layers": len(layers),
            "fast_weight_init": (f"random sign, P(+1) = {o.random_sign_init}" if o.random_sign_init > 0
                                 else f"N(1, {-o.random_sign_init}^2)"),
            "fast_params": sum(p.numel() for p in parameter_groups(net)["fast_weights"]),
            "member_bias_params": sum(p.numel() for p in parameter_groups(net)["member_biases"]),
        })
        return BatchEnsembleModel(net, o.num_members, ctx.num_classes)

    def fit(self, ctx: FitContext) -> EnsembleModel:
        o = self.options
        model = self.build(ctx)
        groups = parameter_groups(model.net)
        params = [{"params": groups["slow"], "name": "slow"},
                  {"params": groups["fast_weights"], "name": "fast_weights",
                   "lr_scale": o.fast_weight_lr_multiplier, "weight_decay": 0.0}]
        if groups["member_biases"]:
            params.append({"params": groups["member_biases"], "name": "member_biases",
                           "lr_scale": o.fast_weight_lr_multiplier})
        res = ctx.trainer.fit(model, stage="batch_ensemble", loss_fn=batch_ensemble_loss, params=params,
                              seed=("batch_ensemble", ctx.seed))
        bs = res.recipe.get("batch_size", ctx.config.batch_size)
        ctx.info.update(unique_images_per_step=bs, rows_per_step=bs * o.num_members, steps=res.steps)
        return model
