"""What the loop's switches buy on this machine, measured side by side in one run.

    python bench/loop.py [--backbone resnet18] [--size 128] [--repeats 3]

Prints, as ratios of step time (or data-wait share) in the same process:
  * bf16 autocast vs fp32,
  * channels_last vs contiguous NCHW,
  * data-wait share of a training epoch with 0 vs 2 DataLoader workers.
Then prints an estimate for an H100 node, taken from published figures, NOT measured here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from cxr_automl import config
from cxr_automl.train.loop import Trainer

H100_NOTE = """\
Estimate for one H100 (SXM) node — from published figures, NOT measured here:
  * bf16 vs fp32: NVIDIA's H100 datasheet lists ~67 TFLOPS FP32 (non-tensor), ~495 TF32 and ~990 BF16
    dense tensor-core TFLOPS. Without autocast PyTorch matmuls/convs run in FP32 or TF32 (TF32 only if
    enabled), so bf16 autocast can be up to ~2x the TF32 and far above FP32 compute throughput for
    matmul/conv-bound models (Swin-B, ViT-B); memory-bound layers gain less (bytes halve).
  * channels_last: cuDNN's tensor-core convolution kernels operate on NHWC; NVIDIA's deep-learning
    performance guide recommends NHWC for mixed-precision convolutions, and PyTorch's channels_last
    tutorial reports speed-ups for CNNs under AMP. It matters for ResNet/ConvNeXt, little for ViTs.
  * DataLoader workers: on a GPU a training step takes milliseconds, so CPU-side JPEG/PNG decoding
    dominates unless workers (one per allocated CPU, minus one; trainer.num_workers=auto) and the
    preprocessed cache keep the data-wait share near zero.
Whether bf16 pays on a CPU depends on its bf16 support (AVX512-BF16 / AMX); the ratios above are this
machine's, printed side by side, never asserted.
"""


def epoch_stats(overrides: list[str], repeats: int) -> tuple[float, float]:
    """Median images/s and data-wait share over ``repeats`` epochs of one trainer."""
    cfg = config.compose(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, tmp, callbacks=[])
        plan = t.strategy.plan(0, t.model)
        t.train_epoch(plan)  # warm-up
        runs = [t.train_epoch(plan) for _ in range(repeats)]
    return (statistics.median(r["train/images_per_s"] for r in runs),
            statistics.median(r["train/data_wait_share"] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = [f"backbone={args.backbone}", f"backbone.image_size={args.size}", f"dataset.image_size={args.size}",
            f"dataset.n_train={args.n_train}", "dataset.n_val=32", "dataset.n_test=32",
            "strategy=finetune", f"trainer.batch_size={args.batch}", "trainer.progress=false",
            "trainer.num_workers=0"]
    print(f"backbone={args.backbone} size={args.size} batch={args.batch} n_train={args.n_train} "
          f"torch threads={torch.get_num_threads()}")
    fp32, _ = epoch_stats([*base, "trainer.precision=32"], args.repeats)
    bf16, _ = epoch_stats([*base, "trainer.precision=bf16"], args.repeats)
    print(f"fp32 {fp32:7.1f} img/s | bf16 {bf16:7.1f} img/s | step-time ratio bf16/fp32 = {fp32 / bf16:.2f}")
    nchw, _ = epoch_stats(base, args.repeats)
    nhwc, _ = epoch_stats([*base, "trainer.channels_last=true"], args.repeats)
    print(f"NCHW {nchw:7.1f} img/s | channels_last {nhwc:7.1f} img/s | step-time ratio cl/nchw = {nchw / nhwc:.2f}")
    w0, wait0 = epoch_stats([*base, "dataset.augment=true"], args.repeats)
    w2, wait2 = epoch_stats([*base[:-1], "trainer.num_workers=2", "dataset.augment=true"], args.repeats)
    print(f"workers=0: {w0:7.1f} img/s, data-wait share {wait0:.1%} | workers=2: {w2:7.1f} img/s, "
          f"data-wait share {wait2:.1%}")
    print()
    print(H100_NOTE)


if __name__ == "__main__":
    main()
