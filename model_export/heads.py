"""Exit heads: what turns a stage's hidden state into a prediction (and optionally an exit gate).

Heads live in a registry by name so that a model config names its head kind as a string, the
manifest records it (`StageSpec.head`) and recipes add kinds without touching the backbone. A head
sees the whole token tensor [N, T, D] (class token first, then the patch tokens in row-major grid
order) and the stage's input tokens `prev` (the previous hidden state; PALBERT's lambda layer reads
both), and knows where it sits (`stage`, `num_stages`) and the patch grid (`grid`).

A head returns a dict with `logits` [N, C], `features` (the representation its classifier reads,
for recipes that regularise or distil it; never exported) and, when `has_gate` is true, `gate`
[N] in [0, 1]. The export keeps only the keys named in server/bundle.py, so everything a head
computes for `logits` and `gate` runs inside its stage's ONNX segment.

Kinds:
- `linear`: LayerNorm + Linear on the class token (DeeBERT, MET).
- `shared`: one LayerNorm + Linear shared by every exit, the final classifier reused (head-free
  exits as in MuE, https://arxiv.org/abs/2211.11152; its exit signal is `similarity`).
- `lgvit`: LGViT's heterogeneous heads (Xu et al. 2023, https://arxiv.org/abs/2308.00255): local
  perception heads at the shallow half of the early exits, global aggregation heads at the deep
  half, the backbone's linear classifier at the last stage.
- `dmpo`: DMPO's bypass module plus high-order-statistics predictor at early exits (Luo et al.
  2025, https://arxiv.org/abs/2511.03245), linear at the last stage.
- `palbert`: PALBERT's one classifier and one lambda layer shared by every exit, the lambda layer
  reading the class token plus a layer position embedding beside the previous class token
  (Balagansky & Gavrilov 2022, https://arxiv.org/abs/2204.03276; tinkoff-ai/palbert); served with
  `q_exit`.
- `jei`: linear classifier plus a JEI-DNN gate reading its own classifier's prediction (Regol et
  al. 2024, https://arxiv.org/abs/2310.09163); served with `gate`.
Gated heads output gate 1 at the last stage: every sample that gets there leaves (PonderNet's
lambda_N = 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from server.bundle import GATE, LOGITS

FEATURES = "features"


class ExitHead(nn.Module):
    """Base class of exit heads. Subclasses set `kind` (by registering) and implement `forward`."""

    kind: ClassVar[str] = ""
    has_gate: ClassVar[bool] = False
    shared: ClassVar[bool] = False
    """True: one instance serves every exit (built once, reused by every stage)."""
    needs_grid: ClassVar[bool] = False
    """True: reads the patch tokens as an image grid (vision only; text models refuse it)."""

    def __init__(
        self, dim: int, num_classes: int, *, grid: tuple[int, int] = (1, 1), stage: int = 0, num_stages: int = 1
    ):
        super().__init__()
        if dim <= 0 or num_classes <= 1:
            raise ValueError(f"an exit head needs dim > 0 and at least 2 classes, got {dim=}, {num_classes=}")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is not in [0, {num_stages})")
        self.dim, self.num_classes, self.grid = dim, num_classes, tuple(grid)
        self.stage, self.num_stages = stage, num_stages

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @classmethod
    def build_all(cls, dim: int, num_classes: int, num_stages: int, grid: tuple[int, int] = (1, 1)) -> list[ExitHead]:
        """Every stage's head: one per stage, or (`shared`) one instance reused by every stage."""
        if cls.shared:
            head = cls(dim, num_classes, grid=grid, stage=num_stages - 1, num_stages=num_stages)
            return [head] * num_stages
        return [cls(dim, num_classes, grid=grid, stage=i, num_stages=num_stages) for i in range(num_stages)]

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


HEADS: dict[str, type[ExitHead]] = {}


def register_head(kind: str) -> Callable[[type[ExitHead]], type[ExitHead]]:
    """Class decorator: make a head kind available to model configs by name."""

    def add(cls: type[ExitHead]) -> type[ExitHead]:
        if kind in HEADS:
            raise ValueError(f"exit head {kind!r} is already registered ({HEADS[kind].__name__})")
        cls.kind = kind
        HEADS[kind] = cls
        return cls

    return add


def head_class(kind: str) -> type[ExitHead]:
    try:
        return HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown exit head {kind!r}; registered: {sorted(HEADS)}") from None


def build_head(
    kind: str, dim: int, num_classes: int, *, grid: tuple[int, int] = (1, 1), stage: int = 0, num_stages: int = 1
) -> ExitHead:
    """Instantiate a registered head kind; unknown kinds fail with the list of known ones."""
    return head_class(kind)(dim, num_classes, grid=grid, stage=stage, num_stages=num_stages)


def patch_grid(hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens [N, 1 + h*w, D] (class token first) as an image [N, D, h, w]."""
    n, _, d = hidden.shape
    return hidden[:, 1:].transpose(1, 2).reshape(n, d, grid[0], grid[1])


class _Classifier(nn.Module):
    """LayerNorm + Linear: the classifier every head ends in."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.norm(features)
        return {LOGITS: self.fc(z), FEATURES: z}


@register_head("linear")
class LinearHead(ExitHead):
    """LayerNorm + Linear on the class token (DeeBERT / MET style): the cheapest useful exit."""

    def __init__(self, dim: int, num_classes: int, **context: object):
        super().__init__(dim, num_classes, **context)  # type: ignore[arg-type]
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.norm(hidden[:, 0])
        return {LOGITS: self.fc(z), FEATURES: z}


@register_head("shared")
class SharedHead(LinearHead):
    """The final classifier reused at every exit: no exit-specific parameters (MuE's head-free exits)."""

    shared = True


TOKENS = "tokens"
"""Heads that transform the tokens (LGViT's) also return them, [N, T', D], for LGViT's distillation."""


class LocalPerception(nn.Module):
    """LGViT's local perception head body (falcon-xu/LGViT `highway.py`, `conv1_1` / `conv2_1`): the
    patch tokens as a grid, 1x1 conv, GELU, BN, [3x3 depthwise conv, GELU, BN,] 1x1 conv, BN, plus
    the grid itself. Convolutions add the locality that shallow ViT tokens lack."""

    def __init__(self, dim: int, grid: tuple[int, int], expand: int = 2, depthwise: bool = True):
        super().__init__()
        self.grid = grid
        hidden = dim * expand
        self.pw1 = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.BatchNorm2d(hidden))
        self.dw = (nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.GELU(),
                                 nn.BatchNorm2d(hidden)) if depthwise else nn.Identity())
        self.pw2 = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Patch tokens [N, h*w, D] after the body (the head's tokens)."""
        x = patch_grid(hidden, self.grid)
        return (x + self.pw2(self.dw(self.pw1(x)))).flatten(2).transpose(1, 2)


def subsample(hidden: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """LGViT's `DownSampling` (`AvgPool2d(1, stride)`: every stride-th patch token of the grid)."""
    return F.avg_pool2d(patch_grid(hidden, grid), 1, stride).flatten(2).transpose(1, 2)


class GlobalAggregation(nn.Module):
    """LGViT's global aggregation head body (`GlobalSparseAttn`): every `stride`-th patch token of
    the grid, then multi-head self-attention among those tokens (q, k, v all from them, no bias, a
    projection; no residual, no norm), which gathers global semantics at a fraction of full
    attention's cost."""

    def __init__(self, dim: int, grid: tuple[int, int], stride: int = 2, num_heads: int = 2):
        super().__init__()
        self.grid, self.stride = grid, stride
        self.num_heads = num_heads if dim % num_heads == 0 else 1
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The attended subsampled tokens [N, R, D]."""
        x = subsample(hidden, self.grid, self.stride)
        n, r, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        qkv = self.qkv(x).reshape(n, r, 3, h, dh).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * dh**-0.5).softmax(dim=-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(n, r, d))


@register_head("lgvit")
class LGViTHead(ExitHead):
    """LGViT's heterogeneous exits (`DeiTHighway_v2`): local perception at the shallow half of the
    early exits (with the depthwise conv in its first half, `conv1_1`, without it after, `conv2_1`),
    global aggregation at the deep half (subsampling stride 2, then 3), the backbone's own classifier
    on the class token last. A head's tokens are averaged and the class token is added before the
    classifier (`classifier(pooled + cls)`). Deviations: our classifier keeps its LayerNorm, and
    heads have 2 attention heads (8 in LGViT's DeiT-B)."""

    needs_grid = True

    def __init__(self, dim: int, num_classes: int, **context: object):
        super().__init__(dim, num_classes, **context)  # type: ignore[arg-type]
        early = self.num_stages - 1
        local = (early + 1) // 2  # the shallow half (LGViT: layers 4-7 of 4-11)
        self.body: nn.Module | None
        if self.is_last:
            self.role, self.body = "linear", None
        elif self.stage < local:
            self.role = "local"
            self.body = LocalPerception(dim, self.grid, depthwise=self.stage < max(1, local // 2))
        else:
            self.role = "global"
            deep = self.stage - local
            self.stride = 2 if deep < max(1, (early - local) // 2) else 3
            self.body = GlobalAggregation(dim, self.grid, stride=self.stride)
        self.classifier = _Classifier(dim, num_classes)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cls = hidden[:, 0]
        if self.body is None:
            return self.classifier(cls)
        tokens = self.body(hidden)
        out = self.classifier(tokens.mean(dim=1) + cls)
        out[TOKENS] = tokens
        return out


class Bypass(nn.Module):
    """DMPO's lightweight bypass: a zero-initialised bottleneck the predictor's input goes through.
    The predictor reads `hidden + bypass(hidden)`; the next stage gets `hidden` itself, so the
    discriminative transform an early predictor needs lives here, not in the shared tokens."""

    zero_init = True  # the model's weight init leaves `up` at zero (see MultiExitViT)

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, max(1, dim // ratio))
        self.up = nn.Linear(max(1, dim // ratio), dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(F.gelu(self.down(self.norm(hidden))))


class CovariancePool(nn.Module):
    """Second-order pooling: tokens reduced to `reduced` channels, their covariance over the tokens,
    matrix square root by Newton-Schulz iterations (iSQRT-COV, Li et al. 2018), upper triangle.
    All matmuls, so it exports to plain ONNX and runs with any batch size."""

    def __init__(self, dim: int, reduced: int = 16, iterations: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Linear(dim, reduced)
        self.iterations = iterations
        rows, cols = torch.triu_indices(reduced, reduced)
        self.register_buffer("triu", rows * reduced + cols, persistent=False)
        self.register_buffer("eye", torch.eye(reduced), persistent=False)
        self.out_dim = len(rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.reduce(self.norm(hidden))  # [N, T, d]
        x = x - x.mean(dim=1, keepdim=True)
        cov = x.transpose(1, 2) @ x / x.shape[1] + 1e-4 * self.eye  # [N, d, d]
        trace = (cov * self.eye).sum(dim=(1, 2), keepdim=True)
        y, z = cov / trace, self.eye.expand_as(cov)
        for _ in range(self.iterations):
            t = 0.5 * (3.0 * self.eye - z @ y)
            y, z = y @ t, t @ z
        root = y * trace.sqrt()
        return root.flatten(1)[:, self.triu]


@register_head("dmpo")
class DMPOHead(ExitHead):
    """DMPO early exits: bypass module, then a predictor on first-order (class token) and
    high-order (covariance) statistics of the tokens; the last stage keeps the linear classifier."""

    needs_grid = True  # its covariance is over the tokens: one pooled text token has none

    def __init__(self, dim: int, num_classes: int, **context: object):
        super().__init__(dim, num_classes, **context)  # type: ignore[arg-type]
        if self.is_last:
            self.bypass: Bypass | None = None
            self.classifier = _Classifier(dim, num_classes)
            return
        self.bypass = Bypass(dim)
        self.cov = CovariancePool(dim)
        self.classifier = _Classifier(dim + self.cov.out_dim, num_classes)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.bypass is None:
            return self.classifier(hidden[:, 0])
        z = self.bypass(hidden)
        return self.classifier(torch.cat([z[:, 0], self.cov(z)], dim=-1))


class _GatedHead(LinearHead):
    has_gate = True

    def _gate(self, logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Gate [N]; 1 at the last stage, where every sample leaves."""
        if self.is_last:
            return torch.ones_like(logits[:, 0])
        return torch.sigmoid(raw.reshape(-1))


class PonderCore(nn.Module):
    """What PALBERT's exits share (tinkoff-ai/palbert `PonderClassifier` + `layer_positional_embeddings`):
    one classifier, one lambda layer, and a learned embedding of the layer position added to the
    lambda layer's input."""

    def __init__(self, dim: int, num_classes: int, num_stages: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        self.position = nn.Parameter(torch.randn(num_stages, dim) * 0.02)
        self.lambda_norm = nn.LayerNorm(2 * dim)
        self.lambda_fc1 = nn.Linear(2 * dim, dim)
        self.lambda_fc2 = nn.Linear(dim, 1)


@register_head("palbert")
class LambdaHead(_GatedHead):
    """PALBERT's exit at one stage, over the core every stage shares (`PonderCore`): the shared
    classifier on the class token, and the shared lambda layer, an MLP on the class token plus the
    stage's position embedding, beside the class token before the stage (PALBERT's "cat" of the
    previous state), giving lambda_i, the probability of halting here given the sample got here.
    Served with `q_exit` (PALBERT's deterministic Q-exit: leave once 1 - prod(1 - lambda_j) passes).
    Deviation: the classifier keeps our LayerNorm (PALBERT: ALBERT's tanh pooler)."""

    def __init__(self, dim: int, num_classes: int, core: PonderCore | None = None, **context: object):
        ExitHead.__init__(self, dim, num_classes, **context)  # type: ignore[arg-type]
        self.core = core if core is not None else PonderCore(dim, num_classes, self.num_stages)

    @classmethod
    def build_all(cls, dim: int, num_classes: int, num_stages: int, grid: tuple[int, int] = (1, 1)) -> list[ExitHead]:
        core = PonderCore(dim, num_classes, num_stages)
        return [cls(dim, num_classes, core=core, grid=grid, stage=i, num_stages=num_stages) for i in range(num_stages)]

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        core, cls = self.core, hidden[:, 0]
        z = core.norm(cls)
        out = {LOGITS: core.fc(z), FEATURES: z}
        before = cls if prev is None else prev[:, 0]
        pair = core.lambda_norm(torch.cat([cls + core.position[self.stage], before], dim=-1))
        raw = core.lambda_fc2(torch.tanh(core.lambda_fc1(pair)))
        out[GATE] = self._gate(out[LOGITS], raw)
        return out


@register_head("jei")
class JEIGateHead(_GatedHead):
    """Linear classifier (the inference module) plus JEI-DNN's gate (networkslab/dynn): a linear
    layer on four detached uncertainty features of the inference module's own prediction, max
    probability, entropy, margin and the entropy of the squared (renormalised) probabilities. Trained
    on "subsequent" targets (1 from the best exit on), the gate estimates the probability that the
    sample's best exit is here or earlier; it leaves at the first gate >= threshold (JEI-DNN: 0.5).
    Served with `gate`."""

    def __init__(self, dim: int, num_classes: int, **context: object):
        super().__init__(dim, num_classes, **context)
        self.gate_fc = nn.Linear(4, 1)

    def gate_features(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1, keepdim=True)

        top2 = torch.topk(probs, min(2, self.num_classes), dim=-1).values
        squared = probs * probs
        squared = squared / squared.sum(dim=-1, keepdim=True)
        return torch.cat([top2[:, :1], entropy(probs), top2[:, :1] - top2[:, -1:], entropy(squared)], dim=-1)

    def gate_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate before its sigmoid; the features are detached: the gate never moves the classifier."""
        return self.gate_fc(self.gate_features(logits.detach())).reshape(-1)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(hidden)
        out[GATE] = self._gate(out[LOGITS], self.gate_logit(out[LOGITS]))
        return out
