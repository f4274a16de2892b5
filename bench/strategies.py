"""Cost of the papers' strategies, measured side by side in one process (never asserted in tests).

1. mlvicx: one pretraining step (two views, inline context bottlenecks, two expanders, VICReg, LARS)
   vs one supervised fine-tuning step on the same backbone and batch; the share spent drawing views.
2. lock_release: one training step with the student-teacher on vs off (the teacher's extra forward),
   and wall time of one cycle (Lock + Release per dataset) with 1 vs 6 classification datasets of the
   same size, plus peak memory of the step (CUDA: max allocated; CPU: not measured).
   The issue's memory target (6 localization decoders vs 1, ≤ 1.2× with offloading) needs the
   localization heads, which are not in this build.

    python bench/strategies.py [--repeats 5] [--backbone resnet_tiny] [--batch 32] [--size 96]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from cxr_automl import config
from cxr_automl.loop import Trainer
from cxr_automl.trainer_utils import apply_plan


def step_time(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0) -> float:
    """Seconds for one optimizer step of ``trainer``'s strategy on a fixed batch."""
    model, strategy = trainer.model, trainer.strategy
    model.train()
    apply_plan(model, strategy.plan(epoch, model))
    batch = {"image": images, "labels": labels}
    t0 = time.perf_counter()
    out = strategy.forward(model, images, batch)
    loss = strategy.loss(model, out, batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def build(overrides: list[str], tmp: str) -> Trainer:
    return Trainer(config.compose(overrides), tmp, callbacks=[])


def batch_of(trainer: Trainer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [trainer.data.train[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]).to(trainer.device),
            torch.stack([it["labels"] for it in items]).to(trainer.device))


def median_alternating(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--expander-dim", type=int, default=2048)
    ap.add_argument("--n-per-dataset", type=int, default=64)
    args = ap.parse_args()
    common = [f"backbone={args.backbone}", f"trainer.batch_size={args.batch}", f"dataset.image_size={args.size}",
              f"dataset.n_train={max(args.batch, args.n_per_dataset)}", "dataset.n_val=32", "dataset.n_test=32",
              "trainer.progress=false", "head=linear"]
    if args.backbone == "resnet_tiny":
        common.append(f"backbone.image_size={args.size}")
    with tempfile.TemporaryDirectory() as tmp:
        # ---- 1. mlvicx vs supervised ----------------------------------------------------------------
        ssl = build([*common, "strategy=mlvicx", f"strategy.expander_dim={args.expander_dim}"], tmp + "/a")
        sup = build([*common, "strategy=finetune"], tmp + "/b")
        images, labels = batch_of(sup, args.batch)

        def views() -> float:
            t0 = time.perf_counter()
            ssl.strategy.views(images)
            return time.perf_counter() - t0

        t = median_alternating({"mlvicx": lambda: step_time(ssl, images, labels),
                                "finetune": lambda: step_time(sup, images, labels), "views": views}, args.repeats)
        print(f"mlvicx step      {t['mlvicx'] * 1e3:8.1f} ms   supervised step {t['finetune'] * 1e3:8.1f} ms   "
              f"ratio {t['mlvicx'] / t['finetune']:.2f}x   views share {t['views'] / t['mlvicx']:.0%}")

        # ---- 2. lock_release: teacher on/off; one cycle with 1 vs 6 datasets ----------------------
        def lr_trainer(n_sets: int, teacher: bool, tag: str) -> Trainer:
            sets = ", ".join(f"{{name: d{i}, tasks: [cls]}}" for i in range(n_sets))
            return build([*common, "strategy=lock_release", f"strategy.datasets=[{sets}]",
                          "strategy.lock_classification=true", f"strategy.teacher={str(teacher).lower()}"],
                         f"{tmp}/{tag}")

        on, off = lr_trainer(1, True, "on"), lr_trainer(1, False, "off")
        images, labels = batch_of(on, args.batch)
        t = median_alternating({"on": lambda: step_time(on, images, labels, epoch=1),
                                "off": lambda: step_time(off, images, labels, epoch=1)}, args.repeats)
        print(f"lock_release step teacher on {t['on'] * 1e3:8.1f} ms   off {t['off'] * 1e3:8.1f} ms   "
              f"ratio {t['on'] / t['off']:.2f}x")
        for n_sets in (1, 6):
            tr = lr_trainer(n_sets, True, f"cyc{n_sets}")
            if tr.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            tr.fit()
            wall = time.perf_counter() - t0
            peak = (f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if tr.device.type == "cuda"
                    else "n/a on CPU")
            print(f"lock_release cycle, {n_sets} dataset(s): {len(tr.strategy.rows)} epochs, "
                  f"{wall:6.1f} s wall ({wall / n_sets:5.1f} s per dataset), peak memory {peak}")


if __name__ == "__main__":
    main()
