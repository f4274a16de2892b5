"""MLVICX: multi-level variance-covariance self-supervised pretraining, evaluated downstream.

Every loop epoch is a pretraining epoch: two augmented views go through the shared encoder with a
context bottleneck hooked inline after each used stage (the refined map feeds the next stage); the
pooled output y is expanded to z and the aggregated refined maps u to m; the loss is
L_G(z, z') + λ·L_L(m, m'), each VICReg (α, β, γ). The optimizer is timm's LARS over the encoder and
every added module.

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
from timm.optim import Lars
from torch import nn

from cxr_automl.plugin.interfaces import DatasetBundle, EpochPlan, Strategy
from cxr_automl.plugin.strategy import CustomStep, Pretraining
from cxr_automl.train.step import TrainStep
from cxr_automl_plugins.strategies.downstream import Downstream
from cxr_automl_plugins.strategies.mlvicx_parts import INVARIANCE, MLVICXParts, TwoViews, aggregate, vicreg

LOSS_TERMS = ("both", "global", "local")
ENCODER_FILE = "encoder.pt"


def encoder_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the backbone's state dict on the CPU, in the keys ``weights.load_into`` maps."""
    return {key: value.detach().to("cpu", copy=True) for key, value in backbone.state_dict().items()}


class MLVICX(Strategy, CustomStep, Pretraining):  # two views + LARS; exports its encoder
    def __init__(self, epochs: int, lr: float, weight_decay: float, momentum: float, trust_coeff: float,
                 lambda_l: float, alpha: float, beta: float, gamma: float, std_target: float, eps: float,
                 invariance: str, loss_terms: str, num_levels: int, expander_dim: int, local_grid: int,
                 views: dict[str, float], downstream: Downstream, eval_every: int, seed: int):
        if loss_terms not in LOSS_TERMS:
            raise ValueError(f"loss_terms={loss_terms!r}; use one of {', '.join(LOSS_TERMS)} (Table IV)")
        if invariance not in INVARIANCE:
            raise ValueError(f"invariance={invariance!r}; use one of {', '.join(INVARIANCE)}")
        self.epochs = epochs
        self.lr, self.weight_decay, self.momentum, self.trust_coeff = lr, weight_decay, momentum, trust_coeff
        self.lambda_l, self.alpha, self.beta, self.gamma = lambda_l, alpha, beta, gamma
        self.std_target, self.eps, self.invariance, self.loss_terms = std_target, eps, invariance, loss_terms
        self.num_levels, self.expander_dim, self.local_grid = num_levels, expander_dim, local_grid
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
        if not 1 <= self.num_levels <= n - 1:
            raise ValueError(f"num_levels={self.num_levels}: this backbone has {n - 1} intermediate levels")
        levels = list(range(n - 1 - self.num_levels, n - 1))  # the deepest intermediate stages
        try:
            stages = list(backbone.stage_modules())
            self.inline = len(stages) == n
        except NotImplementedError:
            self.inline = False
        model.mlvicx = MLVICXParts(tuple(backbone.feature_channels), backbone.embed_dim, levels,
                                   self.expander_dim, self.local_grid)
        self.data = data
        self.views = TwoViews(size=data.train[0]["image"].shape[-1], **self.view_kwargs)

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
        return Lars(param_groups, lr=self.lr, momentum=self.momentum, trust_coeff=self.trust_coeff)

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
        if not self.inline:  # backbone without stage modules: refine its feature maps post hoc
            refined = [model.mlvicx.bottlenecks[str(i)](out.features[i]) for i in model.mlvicx.levels]
        z = model.mlvicx.global_expander(out.pooled)
        m = model.mlvicx.local_expander(aggregate(refined, model.mlvicx.grid))
        return z, m

    def forward(self, model: nn.Module, images: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        v1, v2 = self.views(images)
        z1, m1 = self.embed(model, v1)
        z2, m2 = self.embed(model, v2)
        return {"z1": z1, "z2": z2, "m1": m1, "m2": m2}

    def loss(self, model: nn.Module, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        terms = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "std_target": self.std_target,
                 "eps": self.eps, "inv_mode": self.invariance}
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


def mlvicx(epochs: int = 10, lr: float = 3e-5, weight_decay: float = 1e-5, momentum: float = 0.9,
           trust_coeff: float = 0.001, lambda_l: float = 1.0, alpha: float = 25.0, beta: float = 25.0,
           gamma: float = 1.0, std_target: float = 1.0, eps: float = 1e-4, invariance: str = "mse",
           loss_terms: str = "both", num_levels: int = 3, expander_dim: int = 2048, local_grid: int = 1,
           crop_min_scale: float = 0.3, hflip_p: float = 0.5, rotation: float = 10.0, jitter: float = 0.4,
           blur_p: float = 0.5, solarize_p: float = 0.1, downstream: str = "probe", downstream_epochs: int = 10,
           downstream_lr: float = 1e-3, downstream_lr_backbone: float = 1e-5, downstream_batch_size: int = 64,
           eval_every: int = 1, seed: int = 0) -> MLVICX:
    """MLVICX pretraining. ``lambda_l``: λ, weight of L_L; ``alpha/beta/gamma``: VICReg weights;
    ``loss_terms``: both | global (L_G only) | local (L_L only), Table IV's arms; ``num_levels``: how
    many of the deepest intermediate stages get a context bottleneck and feed u; ``invariance``: mse
    (VICReg code) | sum (eq. (6) as printed); ``downstream``: probe | finetune, trained for
    ``downstream_epochs`` on the labelled images at every evaluation."""
    if eval_every < 1:
        raise ValueError("eval_every must be >= 1")
    views = {"crop_min_scale": crop_min_scale, "hflip_p": hflip_p, "rotation": rotation, "jitter": jitter,
             "blur_p": blur_p, "solarize_p": solarize_p}
    ds = Downstream(protocol=downstream, epochs=downstream_epochs, lr=downstream_lr,
                    lr_backbone=downstream_lr_backbone, batch_size=downstream_batch_size)
    return MLVICX(epochs, lr, weight_decay, momentum, trust_coeff, lambda_l, alpha, beta, gamma, std_target, eps,
                  invariance, loss_terms, num_levels, expander_dim, local_grid, views, ds, eval_every, seed)
