"""Bridge networks (Yun, Nam, Lee, Lee, ICML 2023, arXiv 2306.11304; specs/bridges.md).

Two trained networks (modes) are joined by a low-loss quadratic Bezier curve in weight space
(methods/_lib/curves.py); the curve's midpoint theta(0.5) is a good member that differs from both ends, but
evaluating it costs a whole forward pass. A small "bridge" network learns to predict the midpoint's
output from an intermediate feature map that the base model computes anyway, so the extra member costs a
fraction of a forward pass.

Stages, each one Trainer stage (checkpointed; a killed run skips the finished ones):
  member<j>  the modes theta_0..theta_k: the single-model recipe of the run (E = ``epochs``), member seeds
             of the suite, so theta_0 is exactly the ``single`` model and theta_0..theta_k the
             ``deep_ensemble`` members of the same seed. The paper keeps each mode's best-validation
             epoch; the suite's default (``base_select="last"``) keeps the last epoch, like its single
             model and deep ensembles, so that "single + bridge" differs from "single" only by the
             bridge; ``base_select="best_val"`` reproduces the paper (the validation split, never test).
  curve<j>   the control point theta_c of the curve between the pair's two modes (fresh random init;
             one l ~ U(0, 1) per minibatch; cross-entropy; the run's recipe) for
             round(curve_epochs_frac * E) epochs. ``curve="line"``: the straight segment, nothing trained.
  bridge<j>  a bridge trained by KL(p_curve(0.5) || p_bridge) (batch mean, no labels) on mixup'ed images
             (lambda ~ Beta(mixup_alpha, mixup_alpha) per minibatch, the same mixed images to the teacher
             and the base feature pass), SGD lr ``bridge_lr`` momentum 0.9 wd ``bridge_weight_decay``,
             linear warm-up then cosine, for round(bridge_epochs_frac * E) epochs; the epoch with the
             lowest KL on the validation split is kept.
  The teacher p_curve(0.5) is the curve's midpoint network with batch-norm statistics recomputed at that
  point (one pass over the training split, train mode, reset statistics).
Stage lengths: the paper trains base models and curves with the same recipe and length (the spec: "same
recipe as stage 1"), so ``curve_epochs_frac`` = 1. For the bridges the spec gives the optimiser but no
length; this suite uses the same length E (``bridge_epochs_frac`` = 1), which is an assumption to check
against the paper's appendix. Both fractions are options; the record keeps the epochs actually run.

Types (``type``; ``num_bridges`` = k):
  1  theta_0 plus k other modes theta_1..theta_k, curves (theta_0, theta_j), bridge j reads theta_0's
     features and predicts the midpoint of curve j. Members: theta_0 + k bridges ("single + bridge k").
  2  "DE K + bridges": one bridge per pair of base models, K the fewest base models whose pairs give k
     bridges (k = 1: K = 2; k = 3: K = 3, every pair), pairs in the order (0, 1), (0, 2), (1, 2), (0, 3), ...;
     bridge j reads the features of both ends concatenated on channels. Members: the K base models + k
     bridges.

Architecture of a bridge (any ``StagedNet``): a fresh copy of the blocks after ``feature_block`` (the
number of blocks the base model's trunk runs: the feature map after the stem and that many blocks),
then ``final``, pooling and a linear head; width x1, or x1/2 (``slim``, a backbone rebuilt with every
channel count halved). Default ``feature_block`` (-1): the output of the second block of the last stage
(block 12 of ResNet-32's 15, so the bridge is blocks 13-15); when the last stage has fewer than three
blocks, one block fewer, so the bridge keeps at least one block (resnet with 2-block stages: the last
block; cnn_small, whose stages have one block: the whole last stage). When the bridge's first block
receives other channels than its own trunk would give it (type 2: twice the channels; slim: the base's
full-width features), that block is rewritten to take them: every conv/norm that reads the block input
takes the new channel count and an identity shortcut becomes a 1x1 projection (conv + batch norm).

Prediction: one ``BridgeEnsemble`` runs each base model's trunk ONCE, keeps the feature map, finishes the
base model from it and runs every bridge on it; members are stacked [M, B, C] (base models, then
bridges) and the harness averages their probabilities.

Cost: the runner measures the whole ensemble (base forwards + bridges). ``ctx.info`` has the bridge's
FLOPs as a fraction of one base forward pass (ResNet-32: about 20% for type 1, 24% type 2, 6% slim),
and ``ctx.add_training_cost`` adds the forward-only work of the bridge stages that the trainer's
3 x forward estimate of the trained module does not see: the teacher's forward and the base trunks'
forward on every training sample, and one forward pass over the training split per teacher to
recompute its batch-norm statistics.
"""
from __future__ import annotations

import math
import operator
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ensemble_bench.api import EnsembleModel, FitContext, Method
from ensemble_bench.backbones import StagedNet
from ensemble_bench.methods._lib.curves import CURVES, Curve, train_curve
from ensemble_bench.errors import UsageError
from ensemble_bench.layers import Layers
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register
from ensemble_bench.methods.single import member_seed

SLIM_WIDTH = 0.5


# --------------------------------------------------------------------------------- architecture
class WidthLayers(Layers):
    """Plain layers with every (non-image) channel count scaled by ``width`` (slim bridges)."""

    def __init__(self, width: float):
        if not width > 0:
            raise ValueError(f"width must be > 0; got {width}")
        self.width = width

    def channels(self, c: int) -> int:
        return max(1, int(round(c * self.width)))


def default_feature_block(net: StagedNet) -> int:
    """Blocks the trunk runs by default: up to the second block of the last stage, keeping at least one
    block of the last stage for the bridge."""
    lengths = [len(s) for s in net.stages]
    return sum(lengths[:-1]) + min(2, lengths[-1] - 1)


def resolve_feature_block(net: StagedNet, feature_block: int) -> int:
    f = default_feature_block(net) if feature_block == -1 else feature_block
    if not 1 <= f <= net.num_blocks - 1:
        raise UsageError(f"bridge feature_block must be -1 (default) or in 1..{net.num_blocks - 1} for this "
                         f"backbone ({net.num_blocks} blocks); got {feature_block}")
    return f


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def retarget_input(block: nn.Module, example: torch.Tensor, c_in: int) -> nn.Module:
    """``block`` rewritten to take ``c_in`` input channels instead of ``example.shape[1]``.

    The block is traced (torch.fx); the layers that read the input, directly or through channel-wise
    layers (norms, activations), are rebuilt: a conv reading it gets ``c_in`` input channels (fresh
    init), a norm on it gets ``c_in`` features, and an addition of the input to a tensor of another shape
    (an identity shortcut) gets a 1x1 projection (conv + batch norm) on the input side."""
    c_old = int(example.shape[1])
    if c_in == c_old:
        return block
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    gm = symbolic_trace(block)
    was_training = block.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    gm.train(was_training)

    def shape(n):
        return tuple(n.meta["tensor_meta"].shape)

    carried: set = set()   # nodes holding the block input (up to channel-wise layers): c_in channels now
    n_proj = 0
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            carried.add(node)
            continue
        ins = [a for a in node.all_input_nodes if a in carried]
        if not ins:
            continue
        if node.op == "output":
            raise ValueError("retarget_input: the block returns its input unchanged")
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1:
                    raise ValueError(f"retarget_input: grouped conv {node.target} reads the block input")
                _set_submodule(gm, node.target, nn.Conv2d(
                    c_in, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    bias=mod.bias is not None, padding_mode=mod.padding_mode))
                continue
            if isinstance(mod, _BatchNorm):
                _set_submodule(gm, node.target, type(mod)(c_in, eps=mod.eps, momentum=mod.momentum,
                                                          affine=mod.affine,
                                                          track_running_stats=mod.track_running_stats))
                carried.add(node)
                continue
            if not list(mod.parameters()) and len(node.all_input_nodes) == 1 and shape(node) == shape(ins[0]):
                carried.add(node)     # ReLU, Dropout, Identity, ...
                continue
            raise ValueError(f"retarget_input: cannot pass new input channels through {node.target} "
                             f"({type(mod).__name__})")
        is_add = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or \
                 (node.op == "call_method" and node.target in ("add", "add_"))
        others = [a for a in node.all_input_nodes if a not in carried]
        if is_add and others:
            other = others[0]
            c_out, h_out = shape(other)[1], shape(other)[2]
            stride = shape(ins[0])[2] // h_out
            name = f"input_proj{n_proj}"
            n_proj += 1
            gm.add_submodule(name, nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                                 nn.BatchNorm2d(c_out)))
            with gm.graph.inserting_before(node):
                proj = gm.graph.call_module(name, (ins[0],))
            node.replace_input_with(ins[0], proj)
            continue
        if len(node.all_input_nodes) == 1 and shape(node) == shape(ins[0]):
            carried.add(node)         # torch.relu and other element-wise functions
            continue
        if is_add:
            carried.add(node)         # input + input
            continue
        raise ValueError(f"retarget_input: cannot pass new input channels through {node.format_node()}")
    gm.graph.lint()
    gm.recompile()
    return gm


class BridgeNet(nn.Module):
    """blocks -> final -> global average pool -> head, on a feature map; ``sources`` are the indices of
    the base models whose features it reads (concatenated on channels in that order)."""

    def __init__(self, blocks: list[nn.Module], final: nn.Module, head: nn.Module, sources: tuple[int, ...]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.final = final
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.sources = tuple(int(s) for s in sources)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.final(self.blocks(h))), 1))


class BridgeEnsemble(EnsembleModel):
    """Base models and bridges: each base model's trunk runs once per forward; members are the base
    models (finished from their cached features) then the bridges (run on the cached features)."""

    def __init__(self, bases: list[StagedNet], bridges: list[BridgeNet], feature_block: int):
        super().__init__(len(bases) + len(bridges))
        self.bases = nn.ModuleList(bases)
        self.bridges = nn.ModuleList(bridges)
        self.feature_block = int(feature_block)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [b.forward_until(x, self.feature_block) for b in self.bases]

    def bridge_input(self, feats: list[torch.Tensor], bridge: BridgeNet) -> torch.Tensor:
        hs = [feats[s] for s in bridge.sources]
        return hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        outs = [b.forward_from(h, self.feature_block) for b, h in zip(self.bases, feats)]
        outs += [br(self.bridge_input(feats, br)) for br in self.bridges]
        return torch.stack(outs, dim=0)


class _Trunk(nn.Module):
    """A base model's stem and first ``f`` blocks (for FLOP counts)."""

    def __init__(self, net: StagedNet, f: int):
        super().__init__()
        self.net, self.f = net, f

    def forward(self, x):
        return self.net.forward_until(x, self.f)


# ------------------------------------------------------------------------------------- training
class MixupSampler:
    """lambda ~ Beta(alpha, alpha) and a permutation per minibatch; state saved in the stage checkpoint."""

    def __init__(self, seed: int, alpha: float):
        self.alpha = alpha
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed % 2**63)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha <= 0:
            return x
        lam = self.rng.betavariate(self.alpha, self.alpha)
        perm = torch.randperm(x.shape[0], generator=self.gen).to(x.device)
        return lam * x + (1.0 - lam) * x[perm]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.rng.setstate(s["rng"])
        self.gen.set_state(s["gen"])


def kl_to_teacher(teacher_logp: torch.Tensor, logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_teacher || p_student), batch mean (``reduction="sum"``: summed over the batch)."""
    return F.kl_div(logits.float().log_softmax(-1), teacher_logp.float(), log_target=True, reduction=reduction)


# ---------------------------------------------------------------------------------------- method
@register("bridge")
class Bridge(Method):
    independent_members = True   # its base models (modes): fit_member; curves and bridges need them all
    staged_backbone = "cuts the base models at a block of their stages"
    summary = "base model(s) + bridge nets predicting Bezier-curve midpoints from cached features"

    @dataclass
    class Config:
        type: int = 1                    # 1: bridges read theta_0's features; 2: both ends' features
        num_bridges: int = 1             # k
        feature_block: int = -1          # blocks run by the trunk; -1: second block of the last stage
        slim: bool = False               # bridge at x1/2 width
        curve: str = "bezier"            # "bezier" (trained control point) or "line" (straight segment)
        curve_epochs_frac: float = 1.0   # curve epochs = round(frac * E)
        bridge_epochs_frac: float = 1.0  # bridge epochs = round(frac * E)
        bridge_lr: float = 0.1
        bridge_weight_decay: float = 1e-5
        bridge_warmup_frac: float = 0.025   # warm-up epochs / bridge epochs (5 of 200)
        mixup_alpha: float = 0.4         # 0: no mixup
        base_select: str = "last"        # modes: "last" epoch (= the suite's single model) or "best_val"

        def __post_init__(self):
            if self.type not in (1, 2):
                raise ValueError(f"type must be 1 or 2; got {self.type}")
            if self.num_bridges < 1:
                raise ValueError(f"num_bridges must be >= 1; got {self.num_bridges}")
            if self.feature_block != -1 and self.feature_block < 1:
                raise ValueError(f"feature_block must be -1 (default) or >= 1; got {self.feature_block}")
            if self.curve not in CURVES:
                raise ValueError(f"curve must be one of {', '.join(CURVES)}; got {self.curve!r}")
            for name in ("curve_epochs_frac", "bridge_epochs_frac", "bridge_lr"):
                if not getattr(self, name) > 0:
                    raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
            if self.bridge_weight_decay < 0:
                raise ValueError(f"bridge_weight_decay must be >= 0; got {self.bridge_weight_decay}")
            if not 0 <= self.bridge_warmup_frac < 1:
                raise ValueError(f"bridge_warmup_frac must be in [0, 1); got {self.bridge_warmup_frac}")
            if self.mixup_alpha < 0:
                raise ValueError(f"mixup_alpha must be >= 0; got {self.mixup_alpha}")
            if self.base_select not in ("last", "best_val"):
                raise ValueError(f"base_select must be 'last' or 'best_val'; got {self.base_select!r}")

    @classmethod
    def paper_recipe(cls, run, backbone):
        """Yun et al. (ICML 2023), appendix: base models and curves with SGD lr 0.1, momentum 0.9, wd 5e-4,
        batch 128, a 5-epoch warm-up (of 200: scaled, E/40) then cosine."""
        return run.replace(lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine",
                           warmup_epochs=run.epochs / 40)

    keep_curves = False   # tests: keep the trained curves and teachers on the instance (CPU)

    # ------------------------------------------------------------------------------- structure
    @property
    def num_modes(self) -> int:
        k = self.options.num_bridges
        if self.options.type == 1:
            return k + 1
        return next(n for n in range(2, k + 3) if n * (n - 1) // 2 >= k)   # fewest bases with k pairs

    @property
    def num_bases(self) -> int:
        return 1 if self.options.type == 1 else self.num_modes

    def pairs(self) -> list[tuple[int, int]]:
        """Mode pairs joined by curve j (= bridge j), j = 1..k."""
        k = self.options.num_bridges
        if self.options.type == 1:
            return [(0, j) for j in range(1, k + 1)]
        every = [(a, b) for b in range(1, self.num_modes) for a in range(b)]   # (0,1), (0,2), (1,2), (0,3), ...
        return every[:k]

    def _mode(self, ctx: FitContext, j: int) -> StagedNet:
        ctx.require_staged_backbone(self.staged_backbone)
        return ctx.make_backbone(seed=member_seed(ctx, j))

    def _bridge(self, ctx: FitContext, base: StagedNet, f: int, j: int, sources: tuple[int, ...]) -> BridgeNet:
        width = SLIM_WIDTH if self.options.slim else 1.0
        net = ctx.make_backbone(layers=WidthLayers(width) if width != 1.0 else None,
                                seed=stable_seed(ctx.seed, "bridge", j))
        blocks = net.blocks()[f:]
        dummy = torch.zeros(2, ctx.in_channels, ctx.image_size, ctx.image_size)
        with torch.no_grad():
            flags = [(m, m.training) for m in (net, base)]
            net.eval()
            base.eval()
            own = net.forward_until(dummy, f)
            fed = base.forward_until(dummy, f)
            for m, t in flags:
                m.train(t)
        if own.shape[2:] != fed.shape[2:]:
            raise UsageError(f"bridge: feature map sizes differ ({tuple(own.shape)} vs {tuple(fed.shape)})")
        first = retarget_input(blocks[0], own, int(fed.shape[1]) * len(sources))
        return BridgeNet([first, *blocks[1:]], net.final, net.head, sources)

    def build(self, ctx: FitContext) -> BridgeEnsemble:
        bases = [self._mode(ctx, j) for j in range(self.num_bases)]
        f = resolve_feature_block(bases[0], self.options.feature_block)
        bridges = []
        for j, (a, b) in enumerate(self.pairs(), start=1):
            sources = (0,) if self.options.type == 1 else (a, b)
            bridges.append(self._bridge(ctx, bases[0], f, j, sources))
        return BridgeEnsemble(bases, bridges, f)

    def stage_epochs(self, ctx: FitContext) -> dict[str, int]:
        e = ctx.epochs
        curve = 0 if self.options.curve == "line" else max(1, int(round(self.options.curve_epochs_frac * e)))
        return {"base": e, "curve": curve,
                "bridge": max(1, int(round(self.options.bridge_epochs_frac * e)))}

    # ------------------------------------------------------------------------------------- fit
    def member_tasks(self) -> int:
        return self.num_modes   # the base models (modes) are independent; curves and bridges need them all

    def fit_member(self, ctx: FitContext, k: int) -> None:
        """Mode k alone (a job of its own), exactly as stage 1 of ``fit`` trains it."""
        ctx.trainer.fit(self._mode(ctx, k), stage=f"member{k}", seed=ctx.member_stage_seed(k),
                        epochs=self.stage_epochs(ctx)["base"], select=self.options.base_select)

    def fit(self, ctx: FitContext) -> BridgeEnsemble:
        o = self.options
        tr = ctx.trainer
        model = self.build(ctx)
        f = model.feature_block
        ep = self.stage_epochs(ctx)

        # stage 1: the modes (the single-model recipe, the suite's member seeds and stage names)
        modes: list[StagedNet] = list(model.bases) + [self._mode(ctx, j) for j in range(self.num_bases, self.num_modes)]
        for j, net in enumerate(modes):
            tr.fit(net, stage=f"member{j}", seed=ctx.member_stage_seed(j), epochs=ep["base"], select=o.base_select)
        for net in modes:
            tr.prepare(net).eval()

        curves_info, bridges_info = [], []
        self.curves, self.teachers = [], []
        extra_flops, bn_s = 0.0, 0.0
        x1 = torch.zeros(1, ctx.in_channels, ctx.image_size, ctx.image_size, device=tr.device)
        base_flops = _flops(modes[0], x1)
        trunk_flops = _flops(_Trunk(modes[0], f), x1)
        for j, ((a, b), bridge) in enumerate(zip(self.pairs(), model.bridges), start=1):
            # stage 2: the curve between modes a and b, and its midpoint with recomputed BN statistics
            curve = Curve(ctx.make_backbone(seed=stable_seed(ctx.seed, "curve", j)), modes[a], modes[b], o.curve)
            tr.prepare(curve)
            train_curve(tr, curve, stage=f"curve{j}", epochs=ep["curve"], seed=("curve", ctx.seed, j))
            bn_gen = torch.Generator().manual_seed(stable_seed(ctx.seed, "bn", j))
            t0 = time.perf_counter()
            teacher = curve.point(0.5, tr.loader("train", generator=bn_gen))
            bn_s += time.perf_counter() - t0
            extra_flops += base_flops * len(tr.data.train)
            curves_info.append({"pair": [a, b], "kind": o.curve,
                                "val_nll": {"0": _val_nll(tr, modes[a]), "0.5": _val_nll(tr, teacher),
                                            "1": _val_nll(tr, modes[b])}})
            # stage 3: the bridge
            res = self._fit_bridge(ctx, model, bridge, teacher, stage=f"bridge{j}", epochs=ep["bridge"],
                                   seed=("bridge", ctx.seed, j))
            extra_flops += res.samples_seen * (base_flops + trunk_flops * len(bridge.sources))
            bridges_info.append({"sources": list(bridge.sources), "curve": j, "best_val_kl": res.best_val,
                                 "best_epoch": res.best_epoch})
            if self.keep_curves:
                self.curves.append(curve.cpu())
                self.teachers.append(teacher.cpu())
            del curve, teacher

        model.eval()
        h1 = model.bridge_input(model.features(x1), model.bridges[0])
        bridge_flops = _flops(model.bridges[0], h1)
        ctx.info.update({
            "type": o.type, "feature_block": f, "num_blocks": modes[0].num_blocks,
            "num_bases": self.num_bases, "num_modes_trained": self.num_modes, "stage_epochs": ep,
            "base_flops": base_flops, "trunk_flops": trunk_flops, "bridge_flops": bridge_flops,
            "bridge_flops_fraction": bridge_flops / base_flops if base_flops else None,
            "curves": curves_info, "bridges": bridges_info,
            "bn_recompute_s": bn_s,   # teachers' batch-norm passes: added to train_s (add_training_cost)
        })
        ctx.add_training_cost(flops=extra_flops, seconds=bn_s)
        return model

    def _fit_bridge(self, ctx: FitContext, model: BridgeEnsemble, bridge: BridgeNet, teacher: nn.Module, *,
                    stage: str, epochs: int, seed: Any):
        o = self.options
        tr = ctx.trainer
        mix = MixupSampler(stable_seed("mixup", seed), o.mixup_alpha)

        def inputs(x):   # the bridge's input: its source base models' trunk features (frozen, eval mode)
            hs = [model.bases[s].forward_until(x, model.feature_block) for s in bridge.sources]
            return hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)

        @torch.no_grad()
        def transform(x, y):
            x = mix(x)
            with tr.autocast():
                t = teacher(x).float().log_softmax(-1)
                h = inputs(x).float()
            return h, t

        def loss(net, h, t):
            return kl_to_teacher(t, net(h))

        val_fn, select = None, "last"
        if tr.data.val is not None:
            val_loader = tr.loader("val", shuffle=False, augment=False)
            with torch.no_grad(), tr.autocast():
                targets = [teacher(x).float().log_softmax(-1) for x, _ in val_loader]

            @torch.no_grad()
            def val_kl(net):
                was = net.training
                net.eval()
                total, n = 0.0, 0
                for (x, _), t in zip(val_loader, targets):
                    with tr.autocast():
                        z = net(inputs(x).float())
                    total += float(kl_to_teacher(t, z, reduction="sum"))
                    n += int(x.shape[0])
                net.train(was)
                return total / max(n, 1)

            val_fn, select = val_kl, "best_val"
        # the bridge network's own stage recipe (part of the method, the same in both recipe modes)
        recipe = ctx.recipe.replace(epochs=epochs, lr=o.bridge_lr, weight_decay=o.bridge_weight_decay,
                                    schedule="cosine", warmup_epochs=o.bridge_warmup_frac * epochs,
                                    mixup_alpha=o.mixup_alpha)
        return tr.fit(bridge, stage=stage, recipe=recipe, loss_fn=loss, batch_transform=transform,
                      select=select, val_fn=val_fn, stateful=[mix], seed=seed)


def _flops(module: nn.Module, x: torch.Tensor) -> float:
    from ensemble_bench.cost import count_flops

    return float(count_flops(module, x)["flops"])


@torch.no_grad()
def _val_nll(trainer: Any, net: nn.Module) -> float | None:
    if trainer.data.val is None:
        return None
    v = trainer.val_nll(net)
    return v if math.isfinite(v) else None
