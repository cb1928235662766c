"""MC Dropout (Gal & Ghahramani, ICML 2016: "Dropout as a Bayesian Approximation: Representing Model
Uncertainty in Deep Learning").

The backbone is trained once with dropout; at test time dropout stays on and the prediction is the
average of M stochastic forward passes, each pass one "member". The deployed ``EnsembleModel`` runs the
M passes in its ``forward`` and returns their logits [M, B, C], so the measured FLOPs and latency are
those of M passes; batch norm uses its running statistics (eval mode) in every pass.

The paper does not train residual networks on CIFAR; the placement, rate and number of passes follow the
reference implementation of MC dropout for the CIFAR ResNets that the other baselines of this suite are
compared against, uncertainty-baselines ``baselines/cifar/dropout.py`` with
``uncertainty_baselines/models/wide_resnet_dropout.py``:

* Where: one dropout per residual block, on the residual branch between its convolutions (the script's
  default ``residual_dropout=True``: "apply dropout only to the residual connections as proposed in the
  original paper", i.e. Zagoruyko & Komodakis' WRN dropout), none on the stem, the shortcuts or the head.
  In the suite's backbones (no backbone is copied; the network is built by the plain layer factory and
  the dropout is put in afterwards, which adds no parameter):
    - the pre-activation WRN block has that dropout slot itself (``WideBasic.dropout``, after the first
      conv, before the second batch norm, exactly where the reference puts it): MC dropout goes there;
    - every other block (post-activation ``BasicBlock``/``Bottleneck`` and ``cnn_small``'s single-conv
      ``ConvBlock``) gets it on the input of the LAST conv of its residual branch (never a shortcut):
      between conv1 and conv2 of a basic block and before conv3 of a bottleneck, which is where
      TorchUncertainty's ResNets (``models/resnet/std.py``) put theirs; for ``cnn_small`` it is the input
      of each block's conv, i.e. after the stem's and every earlier block's ReLU. The conv keeps its name
      and weights (``InputDropoutConv2d`` is an ``nn.Conv2d`` that applies the dropout to its input).
  The layers that got it are listed in the record (``info.dropout_layers``).
* Kind and rate: element-wise dropout (the script's ``filterwise_dropout=False``), rate 0.1
  (``dropout_rate`` flag default); an option. Rate 0 is allowed as a control: every pass is then the
  deterministic network (the ``single`` model of the same seed: same initialisation, same data order).
* Passes: M = 30 (``num_estimators``), the uncertainty-baselines CIFAR leaderboard's "Monte Carlo
  Dropout (size=30)" row; the script's flag default is 1, which is no ensemble.
* Training: one ordinary training of the backbone (ONE dropout sample per image,
  ``num_dropout_samples_training=1``) with dropout drawn from the global RNG (checkpointed by the
  trainer). The per-epoch validation of the learning curve uses the deterministic network (dropout off,
  one pass) to keep validation at the single model's cost; the run's metrics are those of the M-pass
  ensemble.
* Reproducible test-time masks. The model has a ``mask_seed`` (derived from the run seed, recorded as
  ``info.mask_seed``). Every ``forward`` call draws pass k's masks from its own generator seeded with
  ``stable_seed(mask_seed, k)``, consumed layer by layer in network order, so a call's output depends
  only on the weights, the input batch and the seed; the same batch gives the same output whatever
  else ran before. Masks are drawn per element and per row (each image of a batch gets its own masks, as
  ``tf.keras.layers.Dropout`` and ``F.dropout`` draw them). Passes are run ``rows_per_chunk // B`` at a
  time as one batch (TorchUncertainty's ``on_batch``), which bounds the memory; the grouping does not
  change the output because every pass has its own generator. The generators live on the input's device,
  so a CPU and a CUDA evaluation of the same weights draw different masks (CPU's Mersenne Twister, CUDA's
  Philox): each reproducible on its device, both the same distribution, as another machine's rounding is.
  Drawing CUDA's masks on the CPU instead would make the devices agree at the price of generating and
  copying every element's mask on the host (30 passes x 10,000 test images x every dropout layer's
  activations), which would dominate a GPU evaluation and its latency; the record names its device.

Recipe. ``--recipe shared`` (default): the run's recipe. ``--recipe paper``: the reference script's:
SGD with Nesterov momentum 0.9, lr 0.05 per 128 images (scaled linearly with ``batch_size``, as the
script does), 1 warm-up epoch of 200 (scaled: E / 200), lr x 0.2 at epochs 60, 120, 160 of 200 (30 %,
60 %, 80 %), weight decay 6e-4: the script adds ``l2 * sum(w**2)`` with l2 = 3e-4 to the loss for all
kernels, batch-norm parameters and the head's bias (gradient ``2 * l2 * w``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ensemble_bench.api import EnsembleModel, FitContext, Method
from ensemble_bench.errors import UsageError
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register



class MaskSource:
    """The generators of the passes a forward call is running now (one per pass, in row-block order), or
    None outside the ensemble's forward. Shared by every dropout of one network; not module state."""

    def __init__(self) -> None:
        self.generators: list[torch.Generator] | None = None


class MCDropout(nn.Module):
    """Element-wise dropout with rate ``p``:
      inside the ensemble's forward (``source.generators`` set): masks from the passes' generators, row
        block k of the input (pass k) from generator k, whatever the module's train/eval mode;
      training otherwise: ``F.dropout`` (global RNG);
      eval otherwise: identity (the deterministic network)."""

    def __init__(self, p: float, source: MaskSource):
        super().__init__()
        self.p = float(p)
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gens = self.source.generators
        if gens is not None:
            if self.p == 0.0:
                return x
            n = len(gens)
            if x.shape[0] % n:
                raise ValueError(f"MC dropout: {x.shape[0]} rows do not split into {n} passes")
            rows = (x.shape[0] // n, *x.shape[1:])
            keep = torch.cat([torch.rand(rows, generator=g, device=x.device) >= self.p for g in gens])
            return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))
        if self.training:
            return F.dropout(x, self.p, training=True)
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}"


class InputDropoutConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose input goes through ``input_dropout`` first (same name, same weights)."""

    input_dropout: nn.Module

    @classmethod
    def wrap(cls, conv: nn.Conv2d, dropout: nn.Module) -> InputDropoutConv2d:
        """The same conv (settings and the very same parameters) with ``dropout`` on its input. Built on
        the meta device, so nothing is drawn from the RNG or allocated before the parameters are shared."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.input_dropout = dropout
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_dropout(x))


def add_mc_dropout(net: nn.Module, p: float, source: MaskSource) -> list[str]:
    """Put one ``MCDropout`` in each block of a ``StagedNet`` (see the module docstring); returns the
    qualified names of the modules that apply it, in network order."""
    where = []
    for si, stage in enumerate(net.stages):
        for bi, block in enumerate(stage):
            prefix = f"stages.{si}.{bi}"
            slot = getattr(block, "dropout", None)
            if isinstance(slot, (nn.Identity, nn.Dropout)):          # the block's own dropout slot (WRN)
                block.dropout = MCDropout(p, source)
                where.append(f"{prefix}.dropout")
                continue
            convs = [(n, m) for n, m in block.named_modules()
                     if isinstance(m, nn.Conv2d) and n and n.split(".")[0] != "shortcut"]
            if not convs:
                raise UsageError(f"mc_dropout: block {prefix} ({type(block).__name__}) has no conv to put "
                                 f"dropout before")
            name, conv = convs[-1]
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], InputDropoutConv2d.wrap(conv, MCDropout(p, source)))
            where.append(f"{prefix}.{name}")
    return where


class MCDropoutEnsemble(EnsembleModel):
    """``forward(x)``: M stochastic passes of ``net`` with seeded masks -> logits [M, B, C]."""

    rows_per_chunk = 2048     # passes run together as one batch of at most this many rows (>= one pass)

    def __init__(self, net: nn.Module, num_passes: int, mask_seed: int, source: MaskSource):
        super().__init__(num_passes)
        self.net = net
        self.mask_seed = int(mask_seed)
        self.source = source

    def pass_generator(self, k: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(stable_seed(self.mask_seed, "pass", k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        per_chunk = max(1, self.rows_per_chunk // max(b, 1))
        outs = []
        for start in range(0, self.num_members, per_chunk):
            ks = range(start, min(self.num_members, start + per_chunk))
            self.source.generators = [self.pass_generator(k, x.device) for k in ks]
            try:
                out = self.net(x.repeat(len(ks), *([1] * (x.dim() - 1))))
            finally:
                self.source.generators = None
            outs.append(out.reshape(len(ks), b, -1))
        return torch.cat(outs, dim=0)


@register("mc_dropout")
class MCDropoutMethod(Method):
    staged_backbone = "places dropout by the block structure of the stages"
    summary = "MC dropout: the backbone trained once with dropout; M stochastic test-time passes (seeded masks)"

    @dataclass
    class Config:
        dropout_rate: float = 0.1     # element-wise, one per residual block (uncertainty-baselines default)
        num_estimators: int = 30      # M test-time passes (uncertainty-baselines' "size=30")

        def __post_init__(self):
            p = self.dropout_rate
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p < 1.0:
                raise ValueError(f"dropout_rate must be in [0, 1); got {p!r}")
            m = self.num_estimators
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"num_estimators must be an integer >= 1; got {m!r}")

    @classmethod
    def paper_recipe(cls, run, backbone):
        """uncertainty-baselines ``baselines/cifar/dropout.py`` (see the module docstring), scaled to the run's
        epochs and batch size."""
        return run.replace(lr=0.05 * run.batch_size / 128, momentum=0.9, nesterov=True, weight_decay=6e-4,
                           schedule="multistep", milestones=(0.3, 0.6, 0.8), lr_decay=0.2,
                           warmup_epochs=run.epochs / 200)

    @staticmethod
    def mask_seed(ctx: FitContext) -> int:
        return stable_seed(ctx.seed, "mc_dropout", "test_masks")

    def build(self, ctx: FitContext) -> EnsembleModel:
        o = self.options
        ctx.require_staged_backbone(self.staged_backbone)
        net = ctx.make_backbone(seed=ctx.member_seed(0))
        source = MaskSource()
        where = add_mc_dropout(net, o.dropout_rate, source)
        seed = self.mask_seed(ctx)
        ctx.info.update({"dropout_rate": o.dropout_rate, "num_passes": o.num_estimators, "mask_seed": seed,
                         "dropout_layers": where, "dropout": "element-wise, active in every test-time pass"})
        return MCDropoutEnsemble(net, o.num_estimators, seed, source)

    def fit(self, ctx: FitContext) -> EnsembleModel:
        model = self.build(ctx)
        # the backbone trains as the single model does (same init and data order), with its dropout on;
        # validation each epoch: the deterministic network (dropout off)
        ctx.trainer.fit(model.net, stage="mc_dropout", seed=ctx.member_stage_seed(0))
        return model
