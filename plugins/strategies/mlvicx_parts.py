"""MLVICX's building blocks: VICReg terms, the context bottleneck, expanders and the two-view augmenter.

Everything here is created eagerly from sizes known before training (the backbone's
``feature_channels`` and ``embed_dim``), so every parameter exists when the optimizer is built — the
public code creates its 1×1 convs lazily inside ``forward`` and they never reach the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.optim import Lars
from torchvision.transforms import v2

INVARIANCE = ("mse", "sum")


# ----------------------------------------------------------------------------------------------- loss
def invariance(z1: torch.Tensor, z2: torch.Tensor, mode: str = "mse") -> torch.Tensor:
    """inv(Z, Z'). ``sum``: eq. (6) as printed, (1/b)·Σ_i ‖z_i − z'_i‖²; ``mse``: the same divided by
    the dimension r (VICReg's reference code, for which α = 25 was tuned)."""
    sq = (z1 - z2).pow(2)
    if mode == "sum":
        return sq.sum(dim=1).mean()
    if mode == "mse":
        return sq.mean()
    raise ValueError(f"invariance={mode!r}; use one of {', '.join(INVARIANCE)}")


def variance(z: torch.Tensor, std_target: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """var(Z) = (1/r)·Σ_j max(0, Λ − S_j), S_j the unbiased per-dimension std of the batch.

    ε sits inside the square root, S_j = √(Var(z_:j) + ε), as in VICReg's code: outside it (as eq. (7)
    is typeset) it could not keep the gradient finite when a dimension collapses to zero variance.
    """
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)
    return F.relu(std_target - std).mean()


def covariance(z: torch.Tensor) -> torch.Tensor:
    """cov(Z) = (1/r)·Σ_{l≠q} C(Z)_lq², C the unbiased covariance matrix of the batch (eq. (8))."""
    b, r = z.shape
    zc = z - z.mean(dim=0)
    c = zc.T @ zc / (b - 1)
    off = c - torch.diag(torch.diagonal(c))
    return off.pow(2).sum() / r


def vicreg(z1: torch.Tensor, z2: torch.Tensor, alpha: float, beta: float, gamma: float,
           std_target: float = 1.0, eps: float = 1e-4, inv_mode: str = "mse",
           halve_variance: bool = True) -> dict[str, torch.Tensor]:
    """Eq. (3)/(4): α·inv(Z,Z') + β·var + γ·(cov(Z)+cov(Z')), and each term.

    ``var`` is (var(Z)+var(Z'))/2 with ``halve_variance`` — VICReg's reference implementation averages
    the two branches' variance hinges (and sums their covariance terms), and MLVICX takes α, β, γ
    = 25, 25, 1 from VICReg, tuned for that — or var(Z)+var(Z') as eq. (3) is typeset (2× β in effect).
    Computed in float32 whatever the autocast precision (covariances of 2048-d embeddings overflow
    in float16)."""
    if z1.shape[0] < 2:
        raise ValueError("VICReg needs at least 2 images per batch (variance over the batch); "
                         "raise trainer.batch_size")
    z1, z2 = z1.float(), z2.float()
    inv = invariance(z1, z2, inv_mode)
    var = variance(z1, std_target, eps) + variance(z2, std_target, eps)
    if halve_variance:
        var = var / 2
    cov = covariance(z1) + covariance(z2)
    return {"loss": alpha * inv + beta * var + gamma * cov, "inv": inv, "var": var, "cov": cov}


# ----------------------------------------------------------------------------------------------- modules
class ContextBottleneck(nn.Module):
    """Eq. (1)–(2): channel attention σ(Conv1(AvgPool y) + Conv1(MaxPool y)) ⊗ y, then spatial
    attention σ(Conv7([mean_c; max_c])) ⊗ (that). The 1×1 conv is shared by both pooled vectors."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        avg = F.adaptive_avg_pool2d(y, 1)
        mx = F.adaptive_max_pool2d(y, 1)
        k = torch.sigmoid(self.channel_conv(avg) + self.channel_conv(mx)) * y
        pooled = torch.cat([k.mean(dim=1, keepdim=True), k.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial_conv(pooled)) * k


def expander(in_dim: int, width: int) -> nn.Sequential:
    """Three Linear(width) layers with BatchNorm + ReLU between them.

    The last layer stays linear, as in VICReg's expander: a final ReLU would pin unused dimensions at
    exactly zero, where the variance hinge has no gradient to revive them."""
    return nn.Sequential(
        nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width),
    )


def aggregate(maps: list[torch.Tensor], grid: int = 1) -> torch.Tensor:
    """Compound representation u: refined maps resized to the smallest level's size, concatenated
    along channels, then pooled to ``grid``×``grid`` and flattened for the expander."""
    h = min(m.shape[-2] for m in maps)
    w = min(m.shape[-1] for m in maps)
    u = torch.cat([F.adaptive_avg_pool2d(m, (h, w)) for m in maps], dim=1)
    return F.adaptive_avg_pool2d(u, grid).flatten(1)


class MLVICXParts(nn.Module):
    """The modules MLVICX adds to an encoder: one bottleneck per used level and the two expanders.

    Attached to the model as ``model.mlvicx`` so the loop moves, checkpoints and optimizes them with
    everything else; the exported encoder leaves them out."""

    def __init__(self, feature_channels: tuple[int, ...], embed_dim: int, levels: list[int],
                 expander_dim: int, grid: int = 1):
        super().__init__()
        self.levels = list(levels)
        self.grid = grid
        self.bottlenecks = nn.ModuleDict({str(i): ContextBottleneck(feature_channels[i]) for i in self.levels})
        local_dim = sum(feature_channels[i] for i in self.levels) * grid * grid
        self.global_expander = expander(embed_dim, expander_dim)
        self.local_expander = expander(local_dim, expander_dim)


# ----------------------------------------------------------------------------------------------- optimizer
class WarmupLars(Lars):
    """timm's LARS with a linear learning-rate warm-up over its first ``warmup_steps`` steps, applied on
    top of whatever the loop's scheduler sets (the public MLVICX/VICReg recipe: warm-up, then cosine).

    The count lives in the param groups, so it is saved and restored with the optimizer's state."""

    def __init__(self, params, warmup_steps: int = 0, **kwargs):
        super().__init__(params, **kwargs)
        self.warmup_steps = max(0, int(warmup_steps))
        for group in self.param_groups:
            group.setdefault("warmup_done", 0)

    @torch.no_grad()
    def step(self, closure=None):
        done = int(self.param_groups[0]["warmup_done"])
        if done >= self.warmup_steps:
            return super().step(closure)
        factor = (done + 1) / self.warmup_steps
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"], group["warmup_done"] = group["lr"] * factor, done + 1
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr


# ----------------------------------------------------------------------------------------------- views
class TwoViews:
    """Two independently augmented views of a batch (images in [0, 1], N×C×H×W, on any device).

    Random crop-resize, horizontal flip, rotation, brightness/contrast jitter, Gaussian blur and
    solarisation (the paper's list) from torchvision.transforms.v2. v2 draws one set of parameters
    per call, so it is applied image by image to give every image its own transform."""

    def __init__(self, size: int, crop_min_scale: float = 0.3, hflip_p: float = 0.5, rotation: float = 10.0,
                 jitter: float = 0.4, blur_p: float = 0.5, solarize_p: float = 0.1):
        if not 0 < crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale={crop_min_scale} must be in (0, 1]")
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, ~10 % of the side as in SimCLR/BYOL
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(crop_min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(hflip_p),
            v2.RandomRotation(rotation),
            v2.ColorJitter(brightness=jitter, contrast=jitter),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(threshold=0.5, p=solarize_p),
        ])

    def view(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in images]).clamp_(0, 1)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(images), self.view(images)
