"""Data loading: the preprocessed cache vs decoding the original files every epoch, and the share of
a resnet18 training step spent waiting for data with the cache.

Writes ``--n`` NIH-sized (1024×1024 8-bit PNG) film-like images and a labels CSV into a temp folder,
then, with the generic ``csv`` loader at ``--image-size``:

1. loader throughput (images/s through a DataLoader, batch 32, one torch thread as in a loader
   worker) from the cache and from the files, measured alternately ``--repeats`` times; prints both
   and the ratio;
2. one epoch of ``cxr-automl``'s own loop (resnet18, all blocks training) with the cache and without,
   reporting the loop's own ``train/data_wait_share`` (target with the cache: < 10 %).

    python bench/data.py [--n 256] [--image-size 224] [--workers 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader


def write_films(root: Path, n: int, size: int) -> Path:
    """Film-like PNGs (smooth anatomy + mild noise, so they compress like real radiographs)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 0.6 + 0.1 * yy
    for cx in (0.32, 0.68):
        base -= 0.3 * ((((xx - cx) / 0.14) ** 2 + ((yy - 0.47) / 0.28) ** 2) < 1)
    rows = ["image,patient,finding_a,finding_b"]
    for i in range(n):
        img = base + 0.05 * np.sin(2 * np.pi * (8 * yy + rng.random())) + rng.normal(0, 0.01, base.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / f"{i:05d}.png", compress_level=6)
        rows.append(f"{i:05d}.png,p{i // 2},{int(rng.random() < 0.3)},{int(rng.random() < 0.5)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def loader_rate(split, workers: int, batch: int = 32) -> float:
    from cxr_automl.train.loop import collate
    loader = DataLoader(split, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate)
    t0, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["image"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--source-size", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    from cxr_automl.plugin import registry

    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        t0 = time.perf_counter()
        csv_path = write_films(tmp_p, args.n, args.source_size)
        print(f"wrote {args.n} {args.source_size}px PNGs in {time.perf_counter() - t0:.1f} s")
        opts = dict(path=str(csv_path), image_col="image", patient_col="patient", label_cols=["finding_a", "finding_b"],
                    image_size=args.image_size, cache_dir=str(tmp_p / "cache"), val_fraction=0.05)
        t0 = time.perf_counter()
        cached = registry.build("dataset", "csv", **opts, cache=True)
        build_s = time.perf_counter() - t0
        files = registry.build("dataset", "csv", **opts, cache=False)
        print(f"cache built once in {build_s:.1f} s ({args.n / build_s:.0f} images/s)")
        # The loader part runs single-threaded, as DataLoader workers do: with workers=0 the batch is
        # stacked in this process, and torch's multi-threaded stack on a busy 2-core machine measures
        # OpenMP contention (8-200 ms per batch here), not the data path.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        loader_rate(cached.train, args.workers, args.batch)  # warm-up: page cache, first torch calls
        loader_rate(files.train, args.workers, args.batch)
        rates: dict[str, list[float]] = {"cache": [], "files": []}
        for _ in range(args.repeats):  # alternate so machine noise hits both alike
            rates["cache"].append(loader_rate(cached.train, args.workers, args.batch))
            rates["files"].append(loader_rate(files.train, args.workers, args.batch))
        c, f = statistics.median(rates["cache"]), statistics.median(rates["files"])
        print(f"\nloader throughput, {len(cached.train)} train images at {args.image_size}px, "
              f"workers={args.workers}, median of {args.repeats}:")
        print(f"  from the cache      {c:8.0f} images/s")
        print(f"  decoding the files  {f:8.0f} images/s")
        print(f"  ratio cache/files   {c / f:8.1f} x")
        torch.set_num_threads(threads)
        if args.skip_train:
            return
        from cxr_automl import config
        from cxr_automl.train.loop import Trainer
        print(f"\nresnet18 training epoch (batch {args.batch}, {args.image_size}px, all blocks, "
              f"torch threads {torch.get_num_threads()}, loader workers {args.workers}):")
        for cache in (True, False):
            over = ["backbone=resnet18", f"backbone.image_size={args.image_size}", "strategy=finetune",
                    "strategy.epochs=1", "dataset=csv", *[f"dataset.{k}={v}" for k, v in opts.items()
                                                          if k != "label_cols"],
                    "dataset.label_cols=[finding_a,finding_b]", f"dataset.cache={str(cache).lower()}",
                    f"trainer.batch_size={args.batch}", f"trainer.num_workers={args.workers}", "trainer.progress=false"]
            cfg = config.compose(over)
            tr = Trainer(cfg, tmp_p / f"run_{cache}")
            plan = tr.strategy.plan(0, tr.model)
            stats = tr.train_epoch(plan)
            print(f"  cache={str(cache):5}  {stats['train/images_per_s']:6.1f} images/s   "
                  f"data-wait share {100 * stats['train/data_wait_share']:5.1f} %")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
