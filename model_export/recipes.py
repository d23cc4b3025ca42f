"""Tuning recipes of the early-exit literature, in one registry; `offramp train --recipe NAME`.

A recipe says how a multi-exit model is trained (losses, phases, what is frozen), which heads it
works with and which exit criterion its bundle is served with by default. Every recipe gets the
same budget: `TrainConfig.epochs` (and `max_steps`) bound the optimiser steps of all its phases
together, so comparisons are at equal training cost.

- `joint`: every exit's cross-entropy, equal weights (MSDNet, MET's exits, DeeBERT-style).
- `pabee`: PABEE's weighted average, exit j weighted by j (Zhou et al. 2020); served by patience.
- `dmpo`: DMPO's two-phase loss weights: deep exits first (early stages learn to represent), then
  weight moves to the early exits (Luo et al. 2025, https://arxiv.org/abs/2511.03245).
- `lgvit`: LGViT's two stages: alternating weighted exits end to end, then distillation (predictions
  and tokens) from the final exit into the early heads with the backbone frozen (Xu et al. 2023,
  https://arxiv.org/abs/2308.00255; falcon-xu/LGViT).
- `met`: MET: a backbone trained first (the "pre-trained" model, final exit only), then frozen and
  tuned with exit-specific adapters sharing one down- and one up-projection, with graph
  regularisation at the early exits (Liu et al. 2024, https://arxiv.org/abs/2409.13999).
- `palbert`: PonderNet's loss on PALBERT's lambda gates: expected cross-entropy under the halting
  distribution plus KL to a geometric prior (https://arxiv.org/abs/2204.03276); served by q_exit.
- `jei`: JEI-DNN: backbone frozen, a weighted warm-up of the inference modules, then gates (BCE on
  "subsequent" targets from the exit that best trades loss for measured cost) and inference modules
  in alternation (https://arxiv.org/abs/2310.09163; networkslab/dynn).
- `mue`: MuE: one classifier shared by every layer, all layers' task losses; served head-free by
  the similarity of consecutive hidden states (https://arxiv.org/abs/2211.11152).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from model_export.data import Split, Splits
from model_export.heads import FEATURES, HEADS, TOKENS, subsample
from model_export.train import Objective, TrainConfig, TrainResult, total_steps, train
from model_export.vit import MultiExitViT
from server.bundle import GATE, HIDDEN, LOGITS


class Recipe:
    """Base class. Subclasses set the class attributes and implement `fit`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    criterion: ClassVar[str] = "max_prob"
    """The exit criterion the exported bundle's default policy uses."""
    heads: ClassVar[tuple[str, ...] | None] = None
    """Head kinds this recipe trains; None = every head kind without a gate."""
    default_head: ClassVar[str] = "linear"
    conformal_coverage: ClassVar[float | None] = None
    """Bundles of this recipe serve conformal prediction sets with this coverage (server/conformal.py)."""

    def model_overrides(self) -> dict[str, object]:
        """ViTConfig fields the recipe needs (MET's adapters)."""
        return {}

    def allowed_heads(self) -> list[str]:
        if self.heads is not None:
            return list(self.heads)
        return sorted(k for k, cls in HEADS.items() if not cls.has_gate)

    def check_head(self, head: str) -> None:
        if head not in self.allowed_heads():
            raise ValueError(f"recipe {self.name!r} trains heads {self.allowed_heads()}, not {head!r}")

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        raise NotImplementedError


RECIPES: dict[str, Recipe] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    if cls.name in RECIPES:
        raise ValueError(f"recipe {cls.name!r} is already registered")
    RECIPES[cls.name] = cls()
    return cls


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; registered: {sorted(RECIPES)}") from None


# -- shared pieces ---------------------------------------------------------------------------------


def phase(cfg: TrainConfig, share: float, **changes: object) -> TrainConfig:
    """`cfg` cut to `share` of its budget (epochs and max_steps), for one phase of a recipe."""
    epochs = max(1, round(cfg.epochs * share))
    steps = None if cfg.max_steps is None else max(1, round(cfg.max_steps * share))
    return replace(cfg, epochs=epochs, max_steps=steps, **changes)  # type: ignore[arg-type]


def exit_ce(outs: list[dict[str, torch.Tensor]], y: torch.Tensor, smoothing: float,
            reduction: str = "mean") -> torch.Tensor:
    """Every exit's cross-entropy, stacked: [S] (`reduction="mean"`) or [S, N] (`"none"`)."""
    return torch.stack([F.cross_entropy(o[LOGITS], y, reduction=reduction, label_smoothing=smoothing)
                        for o in outs])


def weighted_ce(outs: list[dict[str, torch.Tensor]], y: torch.Tensor, weights: torch.Tensor,
                smoothing: float) -> torch.Tensor:
    return (weights / weights.sum() * exit_ce(outs, y, smoothing)).sum()


def frozen(modules: Iterable[nn.Module]) -> Callable[[], None]:
    """Stop gradients into `modules`; returns the function that undoes it."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)

    def restore() -> None:
        for p in params:
            p.requires_grad_(True)

    return restore


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _fit_frozen(model: MultiExitViT, data: Split, cfg: TrainConfig, freeze: list[nn.Module],
                objective: Objective, progress: bool) -> TrainResult:
    restore = frozen(freeze)
    try:
        return train(model, data, cfg, progress=progress, objective=objective, parameters=trainable(model))
    finally:
        restore()


# -- recipes ---------------------------------------------------------------------------------------


@register_recipe
class Joint(Recipe):
    name = "joint"
    summary = "every exit's cross-entropy, equal weights"

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        return train(model, data, replace(cfg, exit_weights=None), progress=progress)


@register_recipe
class PABEE(Recipe):
    name = "pabee"
    summary = "weighted average of the exits' losses, exit j weighted by j; patience-based exit"
    criterion = "patience"

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        weights = tuple(float(j + 1) for j in range(model.num_stages))
        return train(model, data, replace(cfg, exit_weights=weights), progress=progress)


@register_recipe
class DMPO(Recipe):
    """DMPO. **No public code exists; this is our reading of the paper's abstract**: a two-phase
    schedule of exit loss weights (first the deep exits, so early stages stay representative, then
    the discriminative ability moved to the early exits: weights proportional to j, then to
    S + 1 - j, switching halfway) with DMPO's head (model_export/heads.py). Deviations we know of:
    the weight shapes and the halfway switch are our choice, not the paper's stated values; the
    results docs/recipes.md reports rest on this reading."""

    name = "dmpo"
    summary = "two-phase loss weights: deep exits first, then discriminative ability moved to early exits"
    default_head = "dmpo"
    switch: ClassVar[float] = 0.5
    """Share of the steps in the first phase."""

    def weights(self, num_stages: int, progress: float) -> torch.Tensor:
        j = torch.arange(1, num_stages + 1, dtype=torch.float32)
        return j if progress < self.switch else num_stages + 1 - j

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            outs = m.forward_all(x)
            return weighted_ce(outs, y, self.weights(len(outs), done), cfg.label_smoothing)

        return train(model, data, cfg, progress=progress, objective=objective)


def lgvit_weights(model: nn.Module) -> torch.Tensor:
    """LGViT stage 1's exit weights (`alternating_weighted`): each exit weighted by its 1-based layer,
    the final exit by the depth (falcon-xu/LGViT `modeling_highway_deit.py`)."""
    return torch.tensor([float(blocks[-1] + 1) for blocks in model.stage_blocks])


def hetero_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """LGViT's heterogeneous distillation (`cal_hete_loss`): KL between the channel softmaxes of a
    head's tokens and the final layer's (matching) patch tokens, batchmean."""
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean",
                    log_target=True)


def homo_mse(student: torch.Tensor, teacher: torch.Tensor, gram: bool) -> torch.Tensor:
    """LGViT's homogeneous distillation (`cal_homo_loss`, MSE): raw tokens (local heads) or their
    channel Gram matrices (global heads, `align_type='inner'`)."""
    if gram:
        student, teacher = student.transpose(-1, -2) @ student, teacher.transpose(-1, -2) @ teacher
    return F.mse_loss(student, teacher)


@register_recipe
class LGViT(Recipe):
    """LGViT (Xu et al. 2023), following falcon-xu/LGViT (`modeling_highway_deit.py`, the
    `train_baseline` / `train_distillation` scripts):

    1. end to end, `alternating_weighted`: even steps the final exit's cross-entropy alone, odd steps
       every exit's, exit i weighted by its 1-based layer and the final exit by the depth;
    2. backbone and final classifier frozen, the early heads learn from 0.7 x sum of their CE + 0.3 x
       sum of KL(final || exit) at T = 2, plus 0.01 x heterogeneous (KL of a head's tokens to the final
       layer's patch tokens, subsampled like the global heads; for the first and last local and
       global exits) and 0.01 x homogeneous distillation (local exits' tokens to the last local exit's
       by MSE, global exits' Gram matrices to the last global exit's).

    Deviations: the teacher logits are the final exit's (the official code applies the classifier to
    the last layer without its final LayerNorm); our label smoothing; 2/3 of the budget in stage 1;
    text heads (no tokens) get the prediction terms only."""

    name = "lgvit"
    summary = "alternating weighted exits end to end, then distillation into the early heads, backbone frozen"
    default_head = "lgvit"
    # Not MuE's `shared` head: its early exits are the final exit's classifier, which stage two
    # freezes as the teacher, so nothing would be left to distil into.
    heads = ("dmpo", "lgvit", "linear")
    first_share: ClassVar[float] = 2 / 3
    temperature: ClassVar[float] = 2.0
    kd_weight: ClassVar[float] = 0.3  # LGViT's loss_coefficient: CE gets 1 - this
    hete_weight: ClassVar[float] = 0.01
    homo_weight: ClassVar[float] = 0.01

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        weights, step = lgvit_weights(model), [0]
        final_only = torch.zeros(model.num_stages)
        final_only[-1] = 1.0

        def alternating(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            outs = m.forward_all(x)
            step[0] += 1
            return weighted_ce(outs, y, final_only if step[0] % 2 == 1 else weights, cfg.label_smoothing)

        first = train(model, data, phase(cfg, self.first_share), progress=progress, objective=alternating)
        t, a = self.temperature, self.kd_weight

        def distil(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            outs = m.forward_all(x)
            teacher = outs[-1]
            soft = F.log_softmax(teacher[LOGITS].detach() / t, dim=-1)
            loss = torch.zeros(())
            for o in outs[:-1]:
                ce = F.cross_entropy(o[LOGITS], y, label_smoothing=cfg.label_smoothing)
                kd = F.kl_div(F.log_softmax(o[LOGITS] / t, dim=-1), soft, reduction="batchmean",
                              log_target=True) * t * t
                loss = loss + (1 - a) * ce + a * kd
            return loss + self._token_terms(m, outs)

        freeze = [*model.backbone_modules(), model.heads[-1]]
        second = _fit_frozen(model, data, phase(cfg, 1 - self.first_share), freeze, distil, progress)
        return first.then(second)

    def _token_terms(self, model: nn.Module, outs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        early = [(i, o) for i, o in enumerate(outs[:-1]) if TOKENS in o]
        if not early:
            return torch.zeros(())
        heads = model.heads  # type: ignore[attr-defined]
        last_hidden = outs[-1][HIDDEN].detach()
        local = [i for i, _ in early if heads[i].role == "local"]
        glob = [i for i, _ in early if heads[i].role == "global"]
        loss = torch.zeros(())
        for group in (local, glob):
            for i in sorted({group[0], group[-1]} if group else set()):
                head = heads[i]
                target = last_hidden[:, 1:] if head.role == "local" else subsample(last_hidden, head.grid, head.stride)
                loss = loss + self.hete_weight * hetero_kl(outs[i][TOKENS], target)
            for i in group[:-1]:
                teacher = outs[group[-1]][TOKENS]
                if outs[i][TOKENS].shape == teacher.shape:
                    loss = loss + self.homo_weight * homo_mse(outs[i][TOKENS], teacher, gram=heads[i].role == "global")
        return loss


def graph_regulariser(features: torch.Tensor, anchor: torch.Tensor, y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """MET's graph regularisation of an early exit's features: a graph over the batch, edges
    between samples of one class weighted by how alike the final exit sees them, and the Laplacian
    smoothness sum_ij A_ij |f_i - f_j|^2 of the (normalised) early features on it."""
    f = F.normalize(features, dim=-1)
    g = F.normalize(anchor.detach(), dim=-1)
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    logits = (g @ g.T / tau).masked_fill(~same, float("-inf"))
    adjacency = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # rows without a neighbour: 0
    dist = (f[:, None, :] - f[None, :, :]).pow(2).sum(-1)
    return (adjacency * dist).sum() / len(y)


@register_recipe
class MET(Recipe):
    """MET (multi-exit ViT tuning with exit adapters and graph regularisation). **No public code
    exists; this is our reading of the paper's abstract**: a frozen pretrained backbone tuned with
    E-adapters (one shared down- and up-projection, an exit-specific diagonal scaling per exit) and
    all exit heads, joint CE plus 0.1 x a same-class graph regulariser at every early exit.
    Deviations: adapter width 8, gamma 0.1 and the regulariser's exact form are our choices; on a
    backbone trained from scratch the first `pretrain_share` of the budget trains it for its final
    exit (our stand-in for the pretrained model; on MiniLM / DINOv2 that phase fine-tunes the
    pretrained backbone for the task)."""

    name = "met"
    summary = "frozen backbone tuned with shared-projection exit adapters, graph regularisation at early exits"
    adapter_dim: ClassVar[int] = 8
    pretrain_share: ClassVar[float] = 0.5
    gamma: ClassVar[float] = 0.1

    def model_overrides(self) -> dict[str, object]:
        return {"adapter_dim": self.adapter_dim}

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        if model.adapters is None:
            raise ValueError("recipe 'met' needs a model with adapters (adapter_dim > 0)")
        # 1. The backbone MET starts from: trained for its final exit only, adapters left out.
        final_only = tuple([0.0] * (model.num_stages - 1) + [1.0])
        restore = frozen([model.adapters, *model.heads[:-1]])
        try:
            first = train(model, data, phase(cfg, self.pretrain_share, exit_weights=final_only),
                          progress=progress, parameters=trainable(model))
        finally:
            restore()
        # 2. Parameter-efficient multi-exit tuning: backbone frozen, adapters and heads learn.
        gamma = self.gamma

        def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            outs = m.forward_all(x)
            loss = weighted_ce(outs, y, torch.ones(len(outs)), cfg.label_smoothing)
            for o in outs[:-1]:
                loss = loss + gamma * graph_regulariser(o[FEATURES], outs[-1][FEATURES], y)
            return loss

        second = _fit_frozen(model, data, phase(cfg, 1 - self.pretrain_share), model.backbone_modules(),
                             objective, progress)
        return first.then(second)


def halting_distribution(gates: list[torch.Tensor]) -> torch.Tensor:
    """p_i = lambda_i * prod_{j<i} (1 - lambda_j), [S, N]; the last gate is 1, so rows sum to 1."""
    survive = torch.ones_like(gates[0])
    probs = []
    for g in gates:
        probs.append(survive * g)
        survive = survive * (1 - g)
    return torch.stack(probs)


def geometric_prior(num_stages: int, lambda_p: float) -> torch.Tensor:
    """PALBERT's prior over the halting stage (tinkoff-ai/palbert `src/loss.py` RegularizationLoss):
    p_g[k] = lambda_p (1 - lambda_p)^k, the last stage taking the remaining mass."""
    prior = torch.zeros(num_stages)
    not_halted = 1.0
    for k in range(num_stages):
        prior[k] = not_halted * lambda_p
        not_halted *= 1 - lambda_p
    prior[-1] = 1 - prior[:-1].sum()
    return prior


def prior_kl(p: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KL(prior || p) averaged over the batch, p [S, N]: what PALBERT's `KLDivLoss(p.log(), p_g)` with
    `reduction="batchmean"` computes (the prior first: it penalises halting distributions that put
    little mass where the prior has some)."""
    prior = prior[:, None].expand_as(p)
    return (prior * (torch.log(prior.clamp_min(1e-12)) - torch.log(p.clamp_min(1e-8)))).sum(0).mean()


@register_recipe
class PALBERT(Recipe):
    """PALBERT (Balagansky & Gavrilov 2022), following tinkoff-ai/palbert `src/loss.py`: PonderNet's
    expected task loss under the halting distribution plus beta KL(prior || p) to a geometric prior
    with beta 0.5 and lambda_p 0.1; one classifier and one lambda layer shared by every exit, with a
    layer position embedding (the `palbert` head). Deviations: our label smoothing, and the
    classifier's LayerNorm."""

    name = "palbert"
    summary = "PonderNet loss on PALBERT's lambda layers: expected loss under halting + KL(prior || p), geometric prior"
    criterion = "q_exit"
    heads = ("palbert",)
    default_head = "palbert"
    beta: ClassVar[float] = 0.5
    prior_lambda: ClassVar[float] = 0.1

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        prior = geometric_prior(model.num_stages, self.prior_lambda)
        beta = self.beta

        def objective(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            outs = m.forward_all(x)
            p = halting_distribution([o[GATE] for o in outs])  # [S, N]
            ce = exit_ce(outs, y, cfg.label_smoothing, reduction="none")  # [S, N]
            return (p * ce).sum(0).mean() + beta * prior_kl(p, prior)

        return train(model, data, cfg, progress=progress, objective=objective)


def jei_targets(ce: torch.Tensor, cost: torch.Tensor, tradeoff: float) -> torch.Tensor:
    """JEI-DNN's gate targets (networkslab/dynn `gate_training_helper.py`): each sample's best exit
    k* = argmin_k CE_k + tradeoff x cost_k (cost: cumulative compute / full depth), then "subsequent"
    targets: gate i is 1 for every early exit i >= k*. ce [S, N], cost [S]; returns [S - 1, N]."""
    best = torch.argmin(ce + tradeoff * cost[:, None], dim=0)  # [N]
    onehot = F.one_hot(best, ce.shape[0]).T.float()  # [S, N]
    return onehot[:-1].cumsum(dim=0)


@register_recipe
class JEI(Recipe):
    """JEI-DNN (Regol et al. 2024), following networkslab/dynn: the backbone and its final head
    frozen; a warm-up trains the early inference modules alone, earlier exits weighted more ((G - l)
    x CE_l); then blocks of steps alternate between the gates (BCE on "subsequent" targets from
    argmin_k CE_k + 0.7 cost_k, cost the measured cumulative FLOPs, positives weighted by
    (total - count) / count clipped at 5) and the inference modules (plain CE at every early exit: the
    official gate weighting cancels out). Deviations: our ViT is not pretrained, so the first
    `pretrain_share` of the budget trains the backbone for its final exit (as MET does); no per-exit
    early stopping in the warm-up; positive weights from the training batches seen so far rather than
    a validation pass; blocks of `block_share` of the steps instead of 200 batches; AdamW; our default
    policy certifies its gate threshold instead of JEI-DNN's fixed 0.5 (PUT 0.5 to serve it)."""

    name = "jei"
    conformal_coverage = 0.95  # dynn computes sets for alpha 0.01 ... 0.05; the bundle serves alpha 0.05
    summary = "JEI-DNN: frozen backbone, warm-up, then gates and inference modules trained in alternation"
    criterion = "gate"
    heads = ("jei",)
    default_head = "jei"
    tradeoff: ClassVar[float] = 0.7  # dynn's --ce_ic_tradeoff default
    pretrain_share: ClassVar[float] = 0.4
    warmup_share: ClassVar[float] = 0.2
    block_share: ClassVar[float] = 0.05
    max_pos_weight: ClassVar[float] = 5.0

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        from model_export.export import stage_flops

        s = model.num_stages
        final_only = tuple([0.0] * (s - 1) + [1.0])
        pre = train(model, data, phase(cfg, self.pretrain_share, exit_weights=final_only), progress=progress)
        cost = torch.tensor(stage_flops(model, data), dtype=torch.float32).cumsum(0)  # measured, cumulative
        cost = cost / cost[-1]
        weights = torch.arange(s - 1, 0, -1, dtype=torch.float32)  # G - l for the early exits

        def warmup(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            ce = exit_ce(m.forward_all(x)[:-1], y, cfg.label_smoothing)
            return (weights * ce).sum()

        freeze = [*model.backbone_modules(), model.heads[-1]]
        gates = [h.gate_fc for h in model.heads]
        restore_gates = frozen(gates)
        try:
            warm = _fit_frozen(model, data, phase(cfg, self.warmup_share), freeze, warmup, progress)
        finally:
            restore_gates()
        main = phase(cfg, 1 - self.pretrain_share - self.warmup_share)
        if cfg.max_steps is not None:  # the phases share the budget exactly
            main = replace(main, max_steps=max(1, cfg.max_steps - pre.steps - warm.steps))
        total = total_steps(main, len(data))  # the steps `train` will take in this phase
        block = max(1, round(total * self.block_share / (1 - self.pretrain_share - self.warmup_share)))
        seen, hits, step = [0], torch.zeros(s - 1), [0]

        def alternate(m: nn.Module, x: torch.Tensor, y: torch.Tensor, done: float) -> torch.Tensor:
            outs = m.forward_all(x)
            gate_phase = (step[0] // block) % 2 == 0
            step[0] += 1
            if not gate_phase:
                return exit_ce(outs[:-1], y, cfg.label_smoothing).mean()
            ce = exit_ce(outs, y, 0.0, reduction="none").detach()  # [S, N]
            target = jei_targets(ce, cost, self.tradeoff)  # [S - 1, N]
            best = target.diff(dim=0, prepend=torch.zeros(1, target.shape[1]))  # one-hot of k* among early exits
            seen[0] += target.shape[1]
            hits.add_(best.sum(dim=1))
            pos = ((seen[0] - hits) / hits.clamp_min(1)).clamp(1.0, self.max_pos_weight)
            logits = torch.stack([m.heads[i].gate_logit(outs[i][LOGITS]) for i in range(s - 1)])  # type: ignore[index]
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            return (bce * torch.where(target > 0, pos[:, None], torch.ones_like(bce))).mean()

        loop = _fit_frozen(model, data, main, freeze, alternate, progress)
        return pre.then(warm).then(loop)


@register_recipe
class MuE(Recipe):
    name = "mue"
    summary = "one classifier shared by every layer, every layer's task loss; head-free similarity exit"
    criterion = "similarity"
    default_head = "shared"

    def fit(self, model: MultiExitViT, data: Split, cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
        return train(model, data, replace(cfg, exit_weights=None), progress=progress)


@dataclass(frozen=True)
class RecipeRun:
    """What `train_recipe` produced."""

    model: MultiExitViT
    recipe: str
    head: str
    dataset: str
    result: TrainResult


# Same settings as the demo (model_export/demo.py DEMO_TRAIN), so `joint` + `linear` is the demo.
RECIPE_TRAIN: dict[str, object] = {"epochs": 30, "batch_size": 64, "lr": 3e-3, "label_smoothing": 0.1,
                                   "max_shift": 0}


TEXT_DATASETS = ("rotten-tomatoes",)
PRETRAINED_VISION = ("mnist",)  # the DINOv2 ViT-S/14 of model_export/vision.py
# The pretrained ViT is fine-tuned gently (AdamW at 1e-4, as the sentiment preset), images at 56 px.
VISION_TRAIN: dict[str, object] = {"epochs": 2, "batch_size": 32, "lr": 1e-4, "weight_decay": 0.01,
                                   "warmup_fraction": 0.06, "label_smoothing": 0.1, "threads": 2}


def train_recipe(
    recipe: str,
    head: str | None = None,
    *,
    dataset: str = "digits",
    variant: str = "demo",
    seed: int = 0,
    progress: bool = True,
    splits: Splits | None = None,
    freeze_backbone: bool = False,
    **train_overrides: object,
) -> tuple[RecipeRun, Splits]:
    """Build `variant` with `head` (default: the recipe's), train it with `recipe` on `dataset`.

    `dataset="rotten-tomatoes"` trains the pretrained MiniLM of the sentiment preset
    (model_export/sentiment.py) instead of a ViT; heads that need a patch grid fall back to
    `linear` there. `freeze_backbone` keeps the pretrained backbone fixed for the whole recipe
    (only heads and adapters learn: MET's and DMPO's regime); MET and LGViT's second stage freeze
    it in any case.
    """
    from model_export.train import seed_everything

    r = get_recipe(recipe)
    text = dataset in TEXT_DATASETS
    if head is None and text and getattr(HEADS[r.default_head], "needs_grid", False):
        head = "linear"
    head = head or r.default_head
    r.check_head(head)
    defaults: dict[str, object] = dict(RECIPE_TRAIN)
    if text:
        from model_export.sentiment import SENTIMENT_TRAIN, sentiment_splits

        defaults = dict(SENTIMENT_TRAIN)
        splits = splits or sentiment_splits()  # type: ignore[assignment]
    elif dataset in PRETRAINED_VISION:
        from model_export.data import load_splits

        defaults = dict(VISION_TRAIN)
        splits = splits or load_splits(dataset, seed=0)
    else:
        from model_export.data import load_splits

        splits = splits or load_splits(dataset, seed=0)  # the split is fixed; `seed` varies the model
    assert splits is not None
    cfg = TrainConfig(**{**defaults, "seed": seed, **train_overrides})  # type: ignore[arg-type]
    seed_everything(seed, cfg.threads)
    model: nn.Module
    if text:
        from model_export.sentiment import sentiment_model

        model = sentiment_model(head=head, **r.model_overrides())  # type: ignore[arg-type]
    elif dataset in PRETRAINED_VISION:
        from model_export.vision import MultiExitDinov2

        model = MultiExitDinov2.pretrained(head=head, **r.model_overrides())
    else:
        from model_export.vit import vit

        mean, std = splits.pixel_stats()
        model = vit(variant, head=head, input_mean=mean, input_std=std, **r.model_overrides())
    restore = frozen(model.backbone_modules()) if freeze_backbone else (lambda: None)  # type: ignore[operator]
    try:
        result = r.fit(model, splits.train, cfg, progress=progress)  # type: ignore[arg-type]
    finally:
        restore()
    model.eval()
    return RecipeRun(model, r.name, head, dataset, result), splits  # type: ignore[arg-type]


def export_recipe(run: RecipeRun, out: Path, splits: Splits, *, name: str, seed: int = 0) -> Path:
    """Export a trained recipe into a bundle whose default policy uses the recipe's criterion;
    the checkpoint beside it remembers data set, recipe and criterion for `offramp export`."""
    from model_export.checkpoint import save_checkpoint
    from model_export.export import DATASET_EXPORT_CONFIGS, EXPORT_CONFIGS, export_bundle

    r = get_recipe(run.recipe)
    tokenizer = None
    if run.dataset in TEXT_DATASETS:
        from model_export.text import minilm_folder

        tokenizer = minilm_folder() / "tokenizer.json"
    out = export_bundle(
        run.model, Path(out), splits, name=name, cfg=EXPORT_CONFIGS[DATASET_EXPORT_CONFIGS[run.dataset]],
        criterion=r.criterion, tokenizer=tokenizer, conformal_coverage=r.conformal_coverage,
        created_by=f"offramp train --recipe {run.recipe} --head {run.head} ({run.dataset}, seed {seed}): "
        f"{run.result.steps} steps in {run.result.seconds:.1f} s",
    )
    save_checkpoint(out / "checkpoint.pt", run.model, name=name, data={
        "dataset": run.dataset, "split_seed": 0, "seed": seed, "recipe": run.recipe, "criterion": r.criterion,
        "conformal_coverage": r.conformal_coverage})
    return out
