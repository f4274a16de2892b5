"""MLVICX: multi-level variance-covariance self-supervised pretraining, evaluated downstream.

Every loop epoch is a pretraining epoch: two augmented views go through the shared encoder with a
context bottleneck hooked inline after each used stage (the refined map feeds the next stage; by
default every stage, the last included, as in the paper's Fig. 1 and its public code, so y is pooled
from the refined last stage); the pooled output y is expanded to z and the aggregated refined maps u
to m; the loss is L_G(z, z') + λ·L_L(m, m'), each VICReg (α, β, γ). The optimizer is timm's LARS over
the encoder and every added module, at the public code's schedule by default: lr = lr_base·batch/256
with lr_base 0.2, a linear warm-up of 2 epochs, then the loop's scheduler (cosine), weight decay 1e-6.
The paper's text (Sec. IV-B) gives LARS at 3e-5 with weight decay 1e-5: at LARS's trust 1e-3 that moves
weights by ~3e-8 of their norm per step, so pretraining barely trains (set ``lr`` to use it anyway).

Evaluation is the downstream protocol: ``eval_model`` trains a copy of the encoder + configured head
on the labelled training images (``downstream=probe`` frozen, ``finetune`` end to end; the label
fraction is ``dataset.label_fraction``), so ``val/macro_auc`` — best epoch, Optuna objective,
pruning — and the test metrics are downstream AUCs. The encoder of the best epoch is exported to
``run_dir/encoder.pt``, loadable by the backbone plugin via ``backbone.weights=PATH``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from cxr_automl.plugin.interfaces import DatasetBundle, EpochPlan, Strategy
from cxr_automl.plugin.strategy import CustomStep, Pretraining
from cxr_automl.train.step import TrainStep
from cxr_automl_plugins.strategies.downstream import Downstream
from cxr_automl_plugins.strategies.mlvicx_parts import (INVARIANCE, MLVICXParts, TwoViews, WarmupLars, aggregate,
                                                         vicreg)

LOSS_TERMS = ("both", "global", "local")
ENCODER_FILE = "encoder.pt"


def encoder_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the backbone's state dict on the CPU, in the keys ``weights.load_into`` maps."""
    return {key: value.detach().to("cpu", copy=True) for key, value in backbone.state_dict().items()}


class MLVICX(Strategy, CustomStep, Pretraining):  # two views + LARS; exports its encoder
    def __init__(self, epochs: int, lr: float, weight_decay: float, momentum: float, trust_coeff: float,
                 lambda_l: float, alpha: float, beta: float, gamma: float, std_target: float, eps: float,
                 invariance: str, loss_terms: str, levels: str | int, expander_dim: int, local_grid: int,
                 views: dict[str, float], downstream: Downstream, eval_every: int, seed: int,
                 warmup_epochs: float = 0.0, batch_size: int = 64, halve_variance: bool = True,
                 num_levels: int | None = None):
        if loss_terms not in LOSS_TERMS:
            raise ValueError(f"loss_terms={loss_terms!r}; use one of {', '.join(LOSS_TERMS)} (Table IV)")
        if invariance not in INVARIANCE:
            raise ValueError(f"invariance={invariance!r}; use one of {', '.join(INVARIANCE)}")
        self.epochs = epochs
        self.lr, self.weight_decay, self.momentum, self.trust_coeff = lr, weight_decay, momentum, trust_coeff
        self.lambda_l, self.alpha, self.beta, self.gamma = lambda_l, alpha, beta, gamma
        self.std_target, self.eps, self.invariance, self.loss_terms = std_target, eps, invariance, loss_terms
        self.levels, self.num_levels = levels, num_levels
        self.expander_dim, self.local_grid = expander_dim, local_grid
        self.warmup_epochs, self.batch_size, self.halve_variance = warmup_epochs, batch_size, halve_variance
        self.warmup_steps = 0
        self.view_kwargs, self.downstream, self.eval_every, self.seed = views, downstream, eval_every, seed
        self.data: DatasetBundle | None = None
        self.views: TwoViews | None = None
        self.epoch = 0
        self.inline = True
        self._last_copy: nn.Module | None = None  # the last downstream copy (reused with eval_every > 1)
        self._candidate: dict[str, torch.Tensor] | None = None
        self.best = -math.inf
        self.best_encoder: dict[str, torch.Tensor] | None = None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, model: nn.Module, data: DatasetBundle) -> None:
        """Attach the bottlenecks and expanders as ``model.mlvicx`` (before the loop moves the model
        to its device and builds the optimizer)."""
        backbone = model.backbone
        n = len(backbone.feature_channels)
        if n < 2:
            raise ValueError(f"mlvicx needs a backbone with several feature levels; {type(backbone).__name__} "
                             f"has {n}")
        levels = self.stage_levels(n)
        try:
            stages = list(backbone.stage_modules())
            self.inline = len(stages) == n
        except NotImplementedError:
            self.inline = False
        model.mlvicx = MLVICXParts(tuple(backbone.feature_channels), backbone.embed_dim, levels,
                                   self.expander_dim, self.local_grid)
        self.data = data
        steps_per_epoch = max(1, len(data.train) // self.batch_size)
        self.warmup_steps = int(round(self.warmup_epochs * steps_per_epoch))
        self.views = TwoViews(size=data.train[0]["image"].shape[-1], **self.view_kwargs)

    def stage_levels(self, n: int) -> list[int]:
        """Indices of the stages (of ``n``) that get a context bottleneck."""
        if self.num_levels is not None:  # the pre-audit option: intermediate stages only, never the last
            if not 1 <= self.num_levels <= n - 1:
                raise ValueError(f"num_levels={self.num_levels}: this backbone has {n - 1} intermediate levels")
            return list(range(n - 1 - self.num_levels, n - 1))
        if self.levels == "all":
            return list(range(n))
        k = int(self.levels)
        if not 1 <= k <= n:
            raise ValueError(f"levels={self.levels}: this backbone has {n} stages; use 1..{n} or all")
        return list(range(n - k, n))  # the deepest k stages, the last included

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Encoder and every MLVICX module; biases and norm weights without weight decay (and so
        without LARS adaptation, which timm applies only where weight decay is set)."""
        decay, no_decay = [], []
        for module in (model.backbone, model.mlvicx):
            for p in module.parameters():
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "lr": self.lr, "weight_decay": self.weight_decay, "name": "decay"},
                {"params": no_decay, "lr": self.lr, "weight_decay": 0.0, "name": "no_decay"}]

    def optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return WarmupLars(param_groups, warmup_steps=self.warmup_steps, lr=self.lr, momentum=self.momentum,
                          trust_coeff=self.trust_coeff)

    # -- per epoch -------------------------------------------------------------------------------
    def plan(self, epoch: int, model: nn.Module) -> EpochPlan:
        self.epoch = epoch
        return EpochPlan(phase="pretrain", trainable=[model.backbone, model.mlvicx])

    @contextmanager
    def _refining(self, model: nn.Module, refined: list[torch.Tensor]) -> Iterator[None]:
        """Hooks that replace each used stage's output by its bottleneck-refined map (collected in
        ``refined``). Registered per forward pass, so no hook survives into copies or evaluation."""
        handles = []
        if self.inline:
            stages = model.backbone.stage_modules()
            for level in model.mlvicx.levels:
                block = model.mlvicx.bottlenecks[str(level)]

                def hook(_module, _args, output, block=block):
                    out = block(output)
                    refined.append(out)
                    return out

                handles.append(stages[level].register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def embed(self, model: nn.Module, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, m) of one view: global and multi-level embeddings."""
        refined: list[torch.Tensor] = []
        with self._refining(model, refined):
            out = model.features(view)
        y = out.pooled  # inline: pooled from the refined last stage when that stage is refined
        if not self.inline:  # backbone without stage modules: refine its feature maps post hoc
            refined = [model.mlvicx.bottlenecks[str(i)](out.features[i]) for i in model.mlvicx.levels]
            last = len(out.features) - 1
            if model.mlvicx.levels[-1] == last and refined[-1].shape[1] == y.shape[1]:
                y = refined[-1].mean(dim=(2, 3))  # y from the refined last stage, as inline
        z = model.mlvicx.global_expander(y)
        m = model.mlvicx.local_expander(aggregate(refined, model.mlvicx.grid))
        return z, m

    def forward(self, model: nn.Module, images: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        v1, v2 = self.views(images)
        z1, m1 = self.embed(model, v1)
        z2, m2 = self.embed(model, v2)
        return {"z1": z1, "z2": z2, "m1": m1, "m2": m2}

    def loss(self, model: nn.Module, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        terms = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "std_target": self.std_target,
                 "eps": self.eps, "inv_mode": self.invariance, "halve_variance": self.halve_variance}
        total = outputs["z1"].new_zeros((), dtype=torch.float32)
        if self.loss_terms in ("both", "global"):
            total = total + vicreg(outputs["z1"], outputs["z2"], **terms)["loss"]
        if self.loss_terms in ("both", "local"):
            weight = self.lambda_l if self.loss_terms == "both" else 1.0
            total = total + weight * vicreg(outputs["m1"], outputs["m2"], **terms)["loss"]
        return total

    # -- downstream evaluation ---------------------------------------------------------------------
    def eval_model(self, model: nn.Module, train_step: TrainStep) -> nn.Module:
        """The epoch's downstream copy, trained with the run's ``train_step`` (the loop asks once per
        epoch). With ``eval_every`` > 1, epochs in between return the last copy (same score, so they
        never become the best epoch); the first and the last epoch are always evaluated."""
        if (self._last_copy is None or (self.epoch + 1) % self.eval_every == 0
                or self.epoch == self.epochs - 1):
            assert self.data is not None, "setup() runs before evaluation"
            self._last_copy = self.downstream.fit(model, self.data, train_step, seed=self.seed * 1_000 + self.epoch,
                                                  drop=("mlvicx",))
            self._candidate = encoder_state(model.backbone)
        return self._last_copy

    def after_epoch(self, epoch: int, model: nn.Module, val_metrics: dict[str, float]) -> bool:
        score = val_metrics.get(self.monitor(), -math.inf)
        if score > self.best and self._candidate is not None:
            self.best, self.best_encoder = score, self._candidate
        return False

    def export(self, model: nn.Module, run_dir: Path) -> None:
        """``encoder.pt``: the encoder of the epoch with the best downstream validation AUC (the last
        epoch's if none was evaluated), as ``{"state_dict": ...}`` for ``backbone.weights=PATH``."""
        state = self.best_encoder if self.best_encoder is not None else encoder_state(model.backbone)
        torch.save({"state_dict": state, "source": "mlvicx"}, Path(run_dir) / ENCODER_FILE)

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_encoder": self.best_encoder}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_encoder = float(state["best"]), state["best_encoder"]


def mlvicx(epochs: int = 10, lr_base: float = 0.2, lr: float | None = None, batch_size: int = 64,
           warmup_epochs: float = 2.0, weight_decay: float = 1e-6, momentum: float = 0.9,
           trust_coeff: float = 0.001, lambda_l: float = 1.0, alpha: float = 25.0, beta: float = 25.0,
           gamma: float = 1.0, std_target: float = 1.0, eps: float = 1e-4, invariance: str = "mse",
           halve_variance: bool = True, loss_terms: str = "both", levels: str | int = "all",
           num_levels: int | None = None, expander_dim: int = 2048, local_grid: int = 1,
           crop_min_scale: float = 0.3, hflip_p: float = 0.5, rotation: float = 10.0, jitter: float = 0.4,
           blur_p: float = 0.5, solarize_p: float = 0.1, downstream: str = "probe", downstream_epochs: int = 10,
           downstream_lr: float = 1e-3, downstream_lr_backbone: float = 1e-5, downstream_batch_size: int = 64,
           downstream_patience: int = 10, eval_every: int = 1, seed: int = 0) -> MLVICX:
    """MLVICX pretraining. ``lr_base``: LARS lr per 256 images, scaled by ``batch_size`` (the run's
    ``trainer.batch_size``; the public code's 0.2) unless ``lr`` sets it outright (the paper's text:
    3e-5); ``warmup_epochs``: linear warm-up before the loop's schedule; ``lambda_l``: λ, weight of L_L;
    ``alpha/beta/gamma``: VICReg weights; ``halve_variance``: VICReg code's mean of the two variance
    hinges (else their sum as eq. (3) is typeset); ``loss_terms``: both | global (L_G only) | local
    (L_L only), Table IV's arms; ``levels``: all (every stage, the paper) or k, the deepest k stages,
    that get a context bottleneck and feed u (``num_levels``: the older choice of intermediate stages
    only, never the last; overrides ``levels``); ``invariance``: mse (VICReg code) | sum (eq. (6) as
    printed); ``downstream``: probe | finetune, trained for up to ``downstream_epochs`` on the labelled
    images at every evaluation, stopping after ``downstream_patience`` epochs without a better
    validation macro AUC (0: never; the paper: 10, Sec. IV-B)."""
    if eval_every < 1:
        raise ValueError("eval_every must be >= 1")
    if not (levels == "all" or (str(levels).isdigit() and int(levels) >= 1)):
        raise ValueError(f"levels={levels!r}; use all (every stage, the paper) or a number of deepest stages")
    if batch_size < 1 or warmup_epochs < 0:
        raise ValueError("batch_size must be >= 1 and warmup_epochs >= 0")
    views = {"crop_min_scale": crop_min_scale, "hflip_p": hflip_p, "rotation": rotation, "jitter": jitter,
             "blur_p": blur_p, "solarize_p": solarize_p}
    ds = Downstream(protocol=downstream, epochs=downstream_epochs, lr=downstream_lr,
                    lr_backbone=downstream_lr_backbone, batch_size=downstream_batch_size,
                    patience=downstream_patience)
    peak = lr if lr is not None else lr_base * batch_size / 256
    return MLVICX(epochs, peak, weight_decay, momentum, trust_coeff, lambda_l, alpha, beta, gamma, std_target, eps,
                  invariance, loss_terms, levels, expander_dim, local_grid, views, ds, eval_every, seed,
                  warmup_epochs=warmup_epochs, batch_size=batch_size, halve_variance=halve_variance,
                  num_levels=num_levels)
