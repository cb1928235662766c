"""Network Fission Ensembles, NFE (Lee & Lee, 2024, arXiv 2408.02301; specs/nfe.md).

One network becomes a multi-exit network without adding weights:

1. Prune at initialisation (SNIP). One training batch (512 images) goes through a copy of the network
   whose conv weights are re-initialised Xavier-normal; the saliency of a conv weight is |w * dL/dw|
   (L = cross-entropy of that batch). The global top (1 - sparsity) fraction over all conv layers is
   kept (exactly round((1 - s) * #conv weights) of them); linear and normalisation layers are not
   pruned. The masks are applied to the network that is trained (its own initialisation).
2. Fission. The "later stages" of the backbone exist once per exit path that goes through them; every
   surviving weight of a split layer belongs to exactly one path (an i.i.d. uniform draw per weight
   among the paths that contain the layer: Bernoulli(1/2) for two, one of three for three), so the live
   conv weights of the multi-exit net are exactly those of the pruned single network. Branch copies
   start from the same initial weights as the main path, masked by their part; 1x1 shortcut convs are
   masked and split like every other conv. Each path ends in its own copy of ``final`` (WRN: BN, ReLU),
   pooling and its own freshly initialised linear head.
3. Loss: sum_i CE(z_i, y) + sum_i T^2 KL(q_E || softmax(z_i / T)), q_E = softmax(mean_i z_i / T) with
   the teacher detached (``kd: false`` keeps only the CE sum). The checkpoint is the last epoch (never
   one chosen on the test split). Recipe: ``--recipe shared`` (default) trains with the run's recipe like
   every method; ``--recipe paper`` uses the paper's (Lee & Lee 2024, sec. 4 and the released code): SGD
   with Nesterov momentum 0.9 and the "linear" schedule (constant to 50 %, linear to 0.01x at 90 %, then
   0.01x), lr 0.1, wd 5e-4.

SNIP's loss: the released code applies ``F.nll_loss`` to the raw logits (no log-softmax), which is not a
cross-entropy; the suite uses the cross-entropy that SNIP (Lee et al., 2019) defines and the paper
describes, a deliberate difference from the released code.

Where the exits branch (any ``StagedNet`` with S >= 2 stages; stages counted from 1). The fission
region is always the LAST TWO stages, which hold nearly all conv weights in every suite backbone:
  exits=2  one branch starting at the input of stage S-1 (the stem and stages 1..S-2 are shared);
           stages S-1 and S exist twice (main path, branch), their survivors split in halves.
  exits=3  a branch at the input of stage S-1 (exit 1) and one at the input of stage S, fed by the main
           path's stage S-1 (exit 2); stage S-1 is split in halves (main, exit 1), stage S in thirds.
For the 3-stage nets (WRN, CIFAR ResNets 20/32/56, cnn_small) this is the paper's rule: exits=2
branches after stage 1, exits=3 after stages 1 and 2. For resnet18 / resnet50 (4 stages) stages 3-4
play the role of the later stages: exits=2 branches after stage 2, exits=3 after stages 2 and 3.
Needs a staged backbone (``staged_backbone``: timm models have no stages): one UsageError line.

Members (the order of the [M, B, C] output): the branches by branch point (earliest first), then the
main path. ``combine`` ("probs", the suite's rule, or "logits", the paper's) is the model's attribute.

Pruned weights are exactly zero from the start and stay zero: each conv carries its mask as the
buffer ``weight_mask``, a gradient hook multiplies the weight's gradient by it (so SGD momentum and
weight decay never see a pruned entry) and ``after_step`` re-masks the weights after every optimiser
step. The harness's default ``layer_density`` (non-zero count per layer) is therefore exact.

``ensemble-bench cost`` builds the model without data: SNIP then runs on a synthetic batch
(``COST_SNIP_BATCH`` standard-normal images, random labels). The number of live weights is the same
as in a trained run (it is fixed by the sparsity); the split of live weights among layers, and so the
sparse FLOPs, is SNIP's choice on that batch and can differ slightly from a run's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ensemble_bench.api import COMBINE_RULES, EnsembleModel, FitContext, Method, member_cross_entropy
from ensemble_bench.backbones import StagedNet
from ensemble_bench.errors import UsageError
from ensemble_bench.train import stable_seed
from ensemble_bench.methods import register

SNIP_BATCH = 512        # images of the one SNIP batch (the paper's)
COST_SNIP_BATCH = 16    # synthetic images when the model is built without data (``cost``)
MASK = "weight_mask"    # name of the mask buffer on every conv


# ------------------------------------------------------------------------------------------- SNIP
def conv_layers(module: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]


def snip_saliency(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, reinit: bool = True,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """|w * dL/dw| of every conv weight of a copy of ``net`` (``net`` itself is left untouched).

    ``reinit``: the copy's conv weights are first re-drawn Xavier-normal (in ``named_modules`` order,
    from ``generator``). L is the mean cross-entropy of the batch, the copy in training mode."""
    work = copy.deepcopy(net).to(x.device).train()
    convs = conv_layers(work)
    if reinit:
        with torch.no_grad():
            for _, conv in convs:
                w = torch.empty(conv.weight.shape)
                nn.init.xavier_normal_(w, generator=generator)
                conv.weight.copy_(w)
    for p in work.parameters():
        p.requires_grad_(False)
    weights = [conv.weight for _, conv in convs]
    for w in weights:
        w.requires_grad_(True)
    loss = F.cross_entropy(work(x), y)
    grads = torch.autograd.grad(loss, weights)
    return {name: (w.detach() * g).abs().cpu() for (name, _), w, g in zip(convs, weights, grads)}


def global_top_masks(scores: dict[str, torch.Tensor], keep_fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly round(keep_fraction * total) entries with the largest scores, ranked
    over all tensors together (ties broken by position, so the count is exact)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(round(keep_fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out


def snip_masks(net: nn.Module, x: torch.Tensor, y: torch.Tensor, sparsity: float, *, reinit: bool = True,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """SNIP: {conv module name: bool mask} keeping the global top (1 - sparsity) fraction of |w dL/dw|."""
    return global_top_masks(snip_saliency(net, x, y, reinit=reinit, generator=generator), 1.0 - sparsity)


# ---------------------------------------------------------------------------------------- fission
def branch_points(num_stages: int, exits: int) -> list[int]:
    """Number of stages before each branch (0-based index of the first stage the branch owns)."""
    if num_stages < 2:
        raise UsageError(f"nfe needs a backbone with at least 2 stages; this one has {num_stages}")
    return [num_stages - 2] if exits == 2 else [num_stages - 2, num_stages - 1]


def partition(mask: torch.Tensor, parts: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Disjoint masks, one per part, covering ``mask`` exactly: every True entry goes to one part drawn
    uniformly at random (independently per weight)."""
    owner = torch.randint(parts, mask.shape, generator=generator)
    return [mask & (owner == k) for k in range(parts)]


class ExitPath(nn.Module):
    """Stages ``start..S-1`` of a backbone, then its final block, pooling and a head."""

    def __init__(self, start: int, stages: list[nn.Module], final: nn.Module, head: nn.Module):
        super().__init__()
        self.start = start
        self.stages = nn.ModuleList(stages)
        self.final = final
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head

    def out(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.final(h)), 1))


class FissionNet(EnsembleModel):
    """The multi-exit network: shared stem and early stages, then one ``ExitPath`` per exit. ``paths``
    holds the branches by branch point, the main path (the original later stages) last."""

    def __init__(self, stem: nn.Module, shared: list[nn.Module], paths: list[ExitPath], combine: str = "probs"):
        super().__init__(len(paths))
        self.stem = stem
        self.shared = nn.ModuleList(shared)
        self.paths = nn.ModuleList(paths)
        self.combine = combine

    @property
    def main(self) -> ExitPath:
        return self.paths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.shared:
            h = stage(h)
        main = self.main
        feats = {main.start: h}
        for j, stage in enumerate(main.stages):
            h = stage(h)
            feats[main.start + j + 1] = h
        outs = []
        for path in self.paths[:-1]:
            g = feats[path.start]
            for stage in path.stages:
                g = stage(g)
            outs.append(path.out(g))
        outs.append(main.out(h))
        return torch.stack(outs, dim=0)

    # ------------------------------------------------------------------------------- masks
    def masked_convs(self) -> list[tuple[str, nn.Conv2d]]:
        return [(n, m) for n, m in conv_layers(self) if hasattr(m, MASK)]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (called after each optimiser step)."""
        for _, conv in self.masked_convs():
            conv.weight.mul_(getattr(conv, MASK))

    def install_gradient_masks(self) -> None:
        """Multiply every masked conv's weight gradient by its mask (idempotent; a deep copy of the model
        needs its own call, as tensor hooks are not copied). The hook reads the mask buffer through the
        module, so it follows the model across devices."""
        for _, conv in self.masked_convs():
            if getattr(conv.weight, "_nfe_grad_hook", None) is None:
                conv.weight._nfe_grad_hook = conv.weight.register_hook(lambda g, c=conv: g * getattr(c, MASK))

    def live_conv_weights(self) -> int:
        return int(sum(int(getattr(c, MASK).sum()) for _, c in self.masked_convs()))


def _set_mask(conv: nn.Conv2d, mask: torch.Tensor) -> None:
    conv.register_buffer(MASK, mask.clone())
    with torch.no_grad():
        conv.weight.mul_(mask)


def _fresh_head(head: nn.Module) -> nn.Module:
    new = copy.deepcopy(head)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return new


def fission(net: StagedNet, masks: dict[str, torch.Tensor], exits: int, generator: torch.Generator,
            combine: str = "probs") -> FissionNet:
    """The multi-exit network built from ``net`` (its initial weights) and its SNIP ``masks``.

    Every conv of the shared part keeps its SNIP mask. A split layer's survivors are partitioned among
    the paths that contain it; every path's copy starts from the same initial weights masked by its
    part. ``net`` itself becomes the main path (its modules are reused, not copied)."""
    num_stages = len(net.stages)
    points = branch_points(num_stages, exits)
    first = points[0]
    convs = dict(conv_layers(net))
    if set(convs) != set(masks):
        raise ValueError("masks must name every conv of the network")
    for name, conv in convs.items():
        if not name.startswith("stages.") or int(name.split(".")[1]) < first:
            _set_mask(conv, masks[name])

    # copies of the later stages for each branch, taken before any split mask is applied
    init_stages = {j: net.stages[j] for j in range(first, num_stages)}
    branches = [ExitPath(p, [copy.deepcopy(init_stages[j]) for j in range(p, num_stages)],
                         copy.deepcopy(net.final), _fresh_head(net.head)) for p in points]
    main = ExitPath(first, [net.stages[j] for j in range(first, num_stages)], net.final, net.head)

    for j in range(first, num_stages):
        holders = [main] + [b for b in branches if b.start <= j]   # paths containing stage j
        copies = [dict(conv_layers(path.stages[j - path.start])) for path in holders]
        for local, _ in conv_layers(init_stages[j]):
            parts = partition(masks[f"stages.{j}.{local}"], len(holders), generator)
            for conv_map, part in zip(copies, parts):
                _set_mask(conv_map[local], part)
    return FissionNet(net.stem, [net.stages[j] for j in range(first)], branches + [main], combine)


# ------------------------------------------------------------------------------------------- loss
def nfe_loss(logits: torch.Tensor, y: torch.Tensor, temperature: float, kd: bool = True) -> torch.Tensor:
    """sum_i CE(z_i, y) + sum_i T^2 KL(q_E || softmax(z_i / T)), q_E = softmax(mean_i z_i / T) of the
    detached exit logits; KL summed over classes, averaged over the batch. ``logits``: [N, B, C]."""
    loss = member_cross_entropy(logits, y, "sum")
    if not kd:
        return loss
    z = logits.float()
    t = float(temperature)
    log_q = F.log_softmax(z.mean(0).detach() / t, dim=-1)              # teacher, a constant
    log_p = F.log_softmax(z / t, dim=-1)                               # [N, B, C]
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean(-1)              # [N]
    return loss + t * t * kl.sum()


# ----------------------------------------------------------------------------------------- method
@register("nfe")
class NetworkFissionEnsembles(Method):
    staged_backbone = "branches the network at its stage boundaries"
    summary = "SNIP-pruned network split into a multi-exit ensemble with ensemble distillation"

    @dataclass
    class Config:
        sparsity: float = 0.5     # fraction of conv weights pruned by SNIP at initialisation
        exits: int = 2            # 2 or 3 exits (ensemble members)
        temperature: float = 3.0  # distillation temperature T
        kd: bool = True           # add the ensemble-distillation term
        combine: str = "probs"    # "probs" (the suite's rule) or "logits" (the paper's)

        def __post_init__(self):
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"sparsity must be in [0, 1); got {self.sparsity}")
            if self.exits not in (2, 3):
                raise ValueError(f"exits must be 2 or 3; got {self.exits}")
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0; got {self.temperature}")
            if self.combine not in COMBINE_RULES:
                raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}; got {self.combine!r}")

    # ----------------------------------------------------------------------------- building
    def _backbone(self, ctx: FitContext) -> StagedNet:
        ctx.require_staged_backbone(self.staged_backbone)
        return ctx.make_backbone(seed=stable_seed(ctx.seed, "nfe", "init"))

    def _snip_batch(self, ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(stable_seed(ctx.seed, "nfe", "snip-batch"))
        if ctx.trainer is None:   # built without data (cost): a synthetic batch
            x = torch.randn(COST_SNIP_BATCH, ctx.in_channels, ctx.image_size, ctx.image_size, generator=gen)
            y = torch.randint(ctx.num_classes, (COST_SNIP_BATCH,), generator=gen)
            return x.to(ctx.device), y.to(ctx.device)
        x, y = next(iter(ctx.trainer.loader("train", batch_size=SNIP_BATCH, generator=gen)))
        return x, y

    def _assemble(self, ctx: FitContext) -> tuple[FissionNet, StagedNet, dict[str, torch.Tensor], int]:
        """(multi-exit model, the backbone it was made from, SNIP masks by backbone conv name, SNIP batch)."""
        o = self.options
        net = self._backbone(ctx)
        x, y = self._snip_batch(ctx)
        masks = snip_masks(net, x, y, o.sparsity,
                           generator=torch.Generator().manual_seed(stable_seed(ctx.seed, "nfe", "xavier")))
        model = fission(net, masks, o.exits,
                        torch.Generator().manual_seed(stable_seed(ctx.seed, "nfe", "split")), o.combine)
        return model, net, masks, int(x.shape[0])

    @classmethod
    def paper_recipe(cls, run, backbone):
        """Lee & Lee (2024), sec. 4: SGD lr 0.1, momentum 0.9, Nesterov, wd 5e-4, batch 128, the "linear"
        schedule (constant to 50 %, linear to 0.01x at 90 %, then 0.01x)."""
        return run.replace(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="linear",
                           warmup_epochs=0.0)

    def build(self, ctx: FitContext) -> EnsembleModel:
        return self._assemble(ctx)[0]

    # ------------------------------------------------------------------------------ training
    def fit(self, ctx: FitContext) -> EnsembleModel:
        o = self.options
        model, net, masks, n_snip = self._assemble(ctx)
        live = int(sum(int(m.sum()) for m in masks.values()))
        total = sum(m.numel() for m in masks.values())
        if model.live_conv_weights() != live:   # fission must neither add nor drop a live weight
            raise RuntimeError(f"nfe: fission changed the live conv weights ({live} -> {model.live_conv_weights()})")
        by_stage: dict[str, list[int]] = {}
        for name, m in masks.items():
            key = f"stage{int(name.split('.')[1]) + 1}" if name.startswith("stages.") else name.split(".")[0]
            acc = by_stage.setdefault(key, [0, 0])
            acc[0] += int(m.sum())
            acc[1] += m.numel()
        ctx.info.update({
            "sparsity": o.sparsity, "exits": o.exits, "combine": o.combine, "kd": o.kd,
            "temperature": o.temperature,
            "branch_after_stage": branch_points(len(net.stages), o.exits),   # stages counted from 1
            "num_stages": len(net.stages),
            "conv_weights_single": total, "live_conv_weights": live, "live_fraction": live / max(total, 1),
            "density_by_stage": {k: v[0] / max(v[1], 1) for k, v in by_stage.items()},
            "snip_batch": n_snip, "checkpoint": "last",
        })
        try:   # SNIP's one forward/backward of the dense single network, for the training cost
            from ensemble_bench.cost import count_flops

            probe = ctx.trainer.normalizer(ctx.trainer.data.train.x[:1].to(ctx.trainer.device))
            dense = count_flops(net.to(ctx.trainer.device), probe)["flops_dense"]
            ctx.add_training_cost(flops=3.0 * float(dense) * n_snip)
        except Exception:   # an estimate of training cost: never fail a run over it
            pass

        model.install_gradient_masks()

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nfe_loss(m(x), y, o.temperature, o.kd)

        def after_step(m: nn.Module, step: int) -> None:
            model.apply_masks()

        ctx.trainer.fit(model, stage="nfe", loss_fn=loss_fn, after_step=after_step, seed=("nfe", ctx.seed))
        return model
