"""The one training loop. Strategies decide what trains when; callbacks log, checkpoint and prune.

Read ``Trainer.fit`` top to bottom: build → (resume) → for each epoch: plan, train, validate,
callbacks → test on the best epoch's weights → write metrics.json and the task's predictions file
(the evaluator is chosen by ``head.task``, see ``evaluators.py``). Each training step goes through
``step.TrainStep`` (autocast, loss scaler, clipping), which strategies that train inside the run share.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from cxr_automl.plugin import registry
from cxr_automl.plugin.interfaces import DatasetBundle, EpochPlan, predict
from cxr_automl.plugin.strategy import CustomStep, MultiTask, Pretraining, Strategy, undeclared_hooks
from cxr_automl.train.evaluators import Evaluator, PartsWriter, evaluator_for, make_evaluator
from cxr_automl.train.model import CXRModel, build_model
from cxr_automl.train.runtime import (
    NonFiniteLossError,
    TrainerConfig,
    apply_plan,
    fit_threads_to_allocation,
    make_scheduler,
    maybe_compile,
    move_held_modules,
    resolve_device,
    seed_everything,
)
from cxr_automl.train.step import TrainStep, collate  # noqa: F401 (collate: also imported from here)

log = logging.getLogger(__name__)


def to_cpu(value: Any) -> Any:
    """Tensors (also inside the lists/dicts detection heads predict) moved to the CPU for evaluators."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_cpu(v) for v in value]
    return value


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` in an order seeded by (seed, epoch); ``indices`` restricts an epoch to
    part of the split (``MultiTask.train_indices``), None means all of it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.indices: list[int] | None = None

    def __len__(self) -> int:
        return self.n if self.indices is None else len(self.indices)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self), generator=gen).tolist()
        pool = range(self.n) if self.indices is None else self.indices
        return iter([(self.epoch, int(pool[i])) for i in order])


class EpochDataset(torch.utils.data.Dataset):
    """Passes the epoch to a dataset with ``set_epoch`` inside whichever process loads the item,
    so per-epoch augmentation is the same with 0 or N (persistent) workers."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


@dataclass
class Callback:
    """Extension points of the loop. Every hook receives the trainer; raise to abort the run."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """After everything is built, before the first epoch (checkpoint restore happens here)."""

    def on_batch_end(self, trainer: "Trainer", loss: float) -> None:
        """After every training micro-batch."""

    def on_epoch_start(self, trainer: "Trainer", plan: EpochPlan, num_batches: int) -> None:
        """After the strategy's plan is applied."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After validation and the strategy's after_epoch; ``trainer.epoch`` is the finished epoch."""

    def on_fit_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After the test evaluation; ``metrics`` is what metrics.json holds."""


@dataclass
class Trainer:
    """Owns model, optimizer, schedule and loop state; everything a checkpoint needs."""

    cfg: dict[str, Any]
    run_dir: Path
    callbacks: Sequence[Callback] = ()
    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    stopped_early: bool = False

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tc = TrainerConfig.from_dict(self.cfg.get("trainer", {}))
        self.device = resolve_device(self.tc.device)
        self.train_step = TrainStep(self.tc, self.device)  # also what eval_model trains with, if it trains
        seed_everything(self.tc.seed, self.tc.deterministic)
        fit_threads_to_allocation()
        d_cfg = dict(self.cfg["dataset"])
        self.data: DatasetBundle = registry.build("dataset", d_cfg.pop("name"), **d_cfg)
        s_cfg = dict(self.cfg["strategy"])
        self.strategy: Strategy = registry.build("strategy", s_cfg.pop("name"), **s_cfg)
        if undeclared := undeclared_hooks(self.strategy):  # hooks the loop would silently never call
            raise TypeError(f"strategy {type(self.strategy).__name__} defines {', '.join(undeclared)}: "
                            "inherit the protocol (cxr_automl.plugin.strategy) so the loop calls them")
        if isinstance(self.strategy, MultiTask):  # e.g. several datasets composed into one
            self.data = self.strategy.prepare_data(self.data)
        self.model: CXRModel = build_model(self.cfg["backbone"], self.cfg["head"], self.data)
        self.strategy.setup(self.model, self.data)
        # modules the strategy holds beside the model (an EMA copy made in setup) follow it to the device
        move_held_modules(self.strategy, self.device, self.tc.channels_last)
        if isinstance(self.strategy, MultiTask):  # may keep parts (inactive heads) off the device
            self.strategy.to_device(self.model, self.device)
        else:
            self.model.to(self.device)
        if self.tc.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.tc.compile:
            size = self.model.backbone.input_spec.size
            example = self.model.adapter(torch.rand(2, self.data.channels, size, size, device=self.device))
            self.model.backbone = maybe_compile(self.model.backbone, example)
        groups = self.strategy.param_groups(self.model)
        self.optimizer = (self.strategy.optimizer(groups) if isinstance(self.strategy, CustomStep)
                          else torch.optim.AdamW(groups))
        self.steps_per_epoch = max(1, len(self.data.train) // self.tc.batch_size // self.tc.accumulate)
        self.scheduler = make_scheduler(self.optimizer, self.tc, self.steps_per_epoch, self.strategy.epochs)
        self.scaler = self.train_step.scaler()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.evaluated: nn.Module | None = None  # eval_model's module of the last epoch run
        self._epoch_first_step, self._epoch_steps = 0, self.steps_per_epoch  # set by each train_epoch
        self._train_loader: DataLoader | None = None
        self._val_loader: DataLoader | None = None

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < self.strategy.epochs and not self.stopped_early:
            plan = self.strategy.plan(self.epoch, self.model)
            apply_plan(self.model, plan)
            train_stats = self.train_epoch(plan)
            # once per epoch: a strategy may train the evaluated module (a pretraining strategy's downstream copy)
            self.evaluated = self.strategy.eval_model(self.model, self.train_step)
            val_metrics, _ = self.evaluate("val", self.evaluated)
            metrics = {"epoch": self.epoch, **train_stats, **val_metrics}
            score = val_metrics.get(self.strategy.monitor(), -math.inf)
            if score > self.best_score:  # keep the evaluated weights of the best epoch for the test
                self.best_score, self.best_epoch = score, self.epoch
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in self.evaluated.state_dict().items()}
            self.stopped_early = self.strategy.after_epoch(self.epoch, self.model, val_metrics)
            self.history.append(metrics)
            self.epoch += 1
            for cb in self.callbacks:
                cb.on_epoch_end(self, metrics)
        if isinstance(self.strategy, Pretraining):
            self.strategy.export(self.model, self.run_dir)
        return self.test()

    def train_loader(self) -> DataLoader:
        """Built once; each epoch's order comes from a sampler seeded by (seed, epoch), so the order
        does not depend on what ran before (exact resume) and persistent workers can be kept."""
        if self._train_loader is None:
            self._sampler = EpochSampler(len(self.data.train), self.tc.seed)
            self._train_loader = self.train_step.loader(
                EpochDataset(self.data.train), self.tc.batch_size, drop_last=True, sampler=self._sampler,
                persistent_workers=self.tc.loader_kwargs()["num_workers"] > 0,
                # its own generator: creating iterators must not consume the global RNG that dropout draws from
                generator=torch.Generator().manual_seed(self.tc.seed))
        self._sampler.epoch = self.epoch
        indices = (self.strategy.train_indices(self.epoch, len(self.data.train))
                   if isinstance(self.strategy, MultiTask) else None)
        self._sampler.indices = None if indices is None else list(indices)
        return self._train_loader

    def train_epoch(self, plan: EpochPlan) -> dict[str, float]:
        self.model.train()
        apply_plan(self.model, plan)  # re-applied: train() above switches frozen blocks back
        loader = self.train_loader()
        k = self.tc.accumulate
        num_batches = (len(loader) // k) * k
        self._epoch_steps = num_batches // k  # optimizer steps this epoch (fewer on a partial epoch)
        for cb in self.callbacks:
            cb.on_epoch_start(self, plan, num_batches)
        total, seen, wait, t0 = 0.0, 0, 0.0, time.perf_counter()
        self._epoch_first_step = self.step
        t_fetch = time.perf_counter()
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            wait += time.perf_counter() - t_fetch
            images = self.train_step.images(batch)
            batch = {k_: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                     for k_, v in batch.items()}
            with self.train_step.autocast():
                outputs = (self.strategy.forward(self.model, images, batch)
                           if isinstance(self.strategy, CustomStep) else self.model(images))
                loss = self.strategy.loss(self.model, outputs, batch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at epoch {self.epoch} batch {i}: lower the learning rates "
                    "(strategy.lr_*), set trainer.grad_clip, or check the labels")
            self.train_step.backward(loss, self.scaler, accumulate=k)
            if (i + 1) % k == 0:
                self.optimizer_step()
            total += float(loss.detach()) * len(images)
            seen += len(images)
            for cb in self.callbacks:
                cb.on_batch_end(self, float(loss.detach()))
            t_fetch = time.perf_counter()
        elapsed = time.perf_counter() - t0
        return {"train/loss": total / max(seen, 1), "train/images_per_s": seen / max(elapsed, 1e-9),
                "train/data_wait_share": wait / max(elapsed, 1e-9),
                "train/lr": self.optimizer.param_groups[0]["lr"]}

    def optimizer_step(self) -> None:
        """One (clipped) optimizer step; the LR schedule then moves to this step's place *within the
        epoch*, so every epoch advances it by one full epoch even when ``train_indices`` visits part of
        the data (a Lock epoch on half a dataset): the schedule counts epochs, not images."""
        self.train_step.optimizer_step(self.optimizer, self.scaler)
        self.step += 1
        done = self.step - self._epoch_first_step  # steps taken this epoch
        n = max(1, self._epoch_steps)
        # == self.step when every epoch has steps_per_epoch steps (train_indices None)
        self.scheduler.set(self.epoch * self.steps_per_epoch + round(done * self.steps_per_epoch / n))
        if isinstance(self.strategy, CustomStep):
            self.strategy.after_step(self.model)

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str, model: nn.Module | None = None) -> tuple[dict[str, float], Evaluator]:
        """Run ``model`` (default: a fresh ``eval_model``) over a split; the head's task picks the
        evaluator (AUC, Dice/IoU, mAP)."""
        model = model if model is not None else self.strategy.eval_model(self.model, self.train_step)
        was_training = model.training
        model.eval()
        multi = isinstance(self.strategy, MultiTask)
        parts = self.strategy.evaluations(model, split) if multi else None
        dataset = getattr(self.data, split)
        if parts is None:  # the model's head on the whole split
            evaluator = make_evaluator(model.head.task, self.data, self.tc.map_iou_thresholds)
            self._run_evaluation(dataset, evaluator, self._head_predict, model, loader=self._split_loader(split))
            metrics = evaluator.compute(split)
        else:  # the strategy's parts, e.g. every (dataset, task) of a multi-task model
            metrics, done = {}, []
            for part in parts:
                if part.place is not None:
                    part.place(model)
                evaluator = evaluator_for(part.task, part.class_names, **part.options)
                self._run_evaluation(torch.utils.data.Subset(dataset, list(part.indices)), evaluator,
                                     part.predict, model, part.label_columns)
                metrics.update(evaluator.compute(f"{split}/{part.prefix}"))
                done.append((part.prefix, evaluator))
            evaluator = PartsWriter(done)
        if multi:
            metrics.update(self.strategy.summarize(split, metrics))
        model.train(was_training)
        return metrics, evaluator

    def _head_predict(self, model: nn.Module, images: torch.Tensor, batch: dict[str, Any]) -> Any:
        out = model(images)
        with torch.autocast(self.device.type, enabled=False):  # predict outside autocast
            return predict(model.head, out, batch)

    def _split_loader(self, split: str) -> DataLoader:
        """A whole split's loader; the validation one is kept with persistent workers (it runs every
        epoch: no worker start-up per validation on a GPU node)."""
        if split != "val" or self.tc.loader_kwargs()["num_workers"] == 0:
            return self.train_step.loader(getattr(self.data, split), self.tc.eval_batch_size, shuffle=False)
        if self._val_loader is None:
            self._val_loader = self.train_step.loader(self.data.val, self.tc.eval_batch_size, shuffle=False,
                                                      persistent_workers=True)
        return self._val_loader

    def _run_evaluation(self, dataset: torch.utils.data.Dataset, evaluator: Evaluator, predict: Any,
                        model: nn.Module, label_columns: Sequence[int] | None = None,
                        loader: DataLoader | None = None) -> None:
        loader = loader or self.train_step.loader(dataset, self.tc.eval_batch_size, shuffle=False)
        for batch in loader:
            images = batch["image"].to(self.device)
            if label_columns is not None:
                batch["labels"] = batch["labels"][:, list(label_columns)]
            with self.train_step.autocast():
                out = predict(model, images, batch)
            evaluator.update(to_cpu(out), batch)

    def best_model(self) -> nn.Module:
        """The evaluated model with the best epoch's weights (a copy), or the current one before any:
        the last epoch's evaluated module when this run trained one (not asked for again: a strategy would
        train its downstream copy anew), else ``eval_model`` (a restored, already finished run)."""
        model = self.evaluated
        if model is None:
            model = self.strategy.eval_model(self.model, self.train_step)
        if self.best_state is not None:
            model = copy.deepcopy(model)
            model.load_state_dict(self.best_state)
        return model

    def test(self) -> dict[str, float]:
        """Test with the best epoch's evaluated weights; write metrics.json and the predictions file."""
        test_metrics, evaluator = self.evaluate("test", self.best_model())
        last = {k: float(v) for k, v in self.history[-1].items()} if self.history else {}
        final = {**last, **test_metrics, "best_epoch": self.best_epoch, "epochs_run": self.epoch,
                 f"best/{self.strategy.monitor()}": self.best_score}
        final = {k: v for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        (self.run_dir / "metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        evaluator.write(self.run_dir)
        for cb in self.callbacks:
            cb.on_fit_end(self, final)
        return final

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        from cxr_automl.train.checkpoint import rng_state
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "strategy": self.strategy.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "stopped_early": self.stopped_early, "rng": rng_state(),
                "config_fingerprint": config_fingerprint(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from cxr_automl.train.checkpoint import CheckpointError, set_rng_state
        if state.get("config_fingerprint") != config_fingerprint(self.cfg):
            raise CheckpointError(
                f"checkpoint in {self.run_dir} was written by a different configuration "
                f"({diff_keys(state.get('config_fingerprint') or {}, config_fingerprint(self.cfg))} differ); "
                "use a new run directory or the original overrides")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.best_score, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
        self.best_state, self.stopped_early = state["best_state"], bool(state["stopped_early"])
        set_rng_state(state["rng"])


#: trainer keys that may differ between a run and its resumption without changing the result
_RESUME_FREE = ("trainer.num_workers", "trainer.progress", "trainer.device", "trainer.map_iou_thresholds",  # scoring only
                "run_dir", "resume")


def config_fingerprint(cfg: dict[str, Any]) -> dict[str, str]:
    """Flat ``key -> repr(value)`` of everything that shapes the result."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif not prefix.startswith(_RESUME_FREE):
            flat[prefix] = repr(node)

    walk(cfg, "")
    return flat


def diff_keys(a: dict[str, str], b: dict[str, str]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
