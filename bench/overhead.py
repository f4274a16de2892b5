"""Training-step throughput of cxr-automl's loop vs a minimal hand-written PyTorch loop.

Same model (registry backbone + head), same batch size, same in-memory synthetic data, measured
alternately in one process; prints images/s of each and the ratio (target: hand / ours <= 1.10).

    python bench/overhead.py [--repeats 5] [--backbone resnet_tiny] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from cxr_automl import config
from cxr_automl.train.loop import Trainer
from cxr_automl.train.model import build_model
from cxr_automl.train.runtime import apply_plan


def hand_loop_epoch(model, opt, images, labels, batch: int) -> float:
    """The minimal loop: shuffle, forward, BCE, backward, step. Returns images/s."""
    model.train()
    perm = torch.randperm(len(images))
    n = (len(images) // batch) * batch
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        idx = perm[i:i + batch]
        loss = F.binary_cross_entropy_with_logits(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--strategy", default="finetune", help="finetune (no EMA) isolates loop overhead")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = [f"backbone={args.backbone}", f"strategy={args.strategy}", f"trainer.batch_size={args.batch}",
                 f"dataset.n_train={args.n_train}", "dataset.n_val=32", "dataset.n_test=32",
                 "dataset.augment=false", "trainer.progress=false"]
    cfg = config.compose(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, callbacks=[])
        data = trainer.data
        images = torch.stack([data.train[i]["image"] for i in range(len(data.train))])
        labels = torch.stack([data.train[i]["labels"] for i in range(len(data.train))])
        hand_model = build_model(cfg["backbone"], cfg["head"], data)
        hand_opt = torch.optim.AdamW(hand_model.parameters(), lr=1e-4)
        plan = trainer.strategy.plan(0, trainer.model)
        apply_plan(trainer.model, plan)
        ours, hand = [], []
        hand_loop_epoch(hand_model, hand_opt, images, labels, args.batch)  # warm-up both
        trainer.train_epoch(plan)
        for _ in range(args.repeats):
            hand.append(hand_loop_epoch(hand_model, hand_opt, images, labels, args.batch))
            ours.append(trainer.train_epoch(plan)["train/images_per_s"])
    h, o = statistics.median(hand), statistics.median(ours)
    print(f"backbone={args.backbone} strategy={args.strategy} batch={args.batch} n={args.n_train} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"hand-written loop : {h:8.1f} images/s  (runs: {', '.join(f'{v:.0f}' for v in hand)})")
    print(f"cxr-automl loop   : {o:8.1f} images/s  (runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"ratio hand/ours   : {h / o:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
