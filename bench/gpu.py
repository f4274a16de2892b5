"""Our training step against the bare model on one GPU, per backbone × head at the papers' resolution and batch.

    python bench/gpu.py --quick          # a few cells, bf16 and fp32, compile on one cell: < 5 min on one H100/H200
    python bench/gpu.py                  # every paper cell × {bf16, fp32} × {eager, compile}
    python bench/gpu.py --cells rad_dino:mlp swin_b:upernet --workers 8 --steps 30

For every row, in the same process and on the same model (same weights, precision, memory format and
batch): images/s of the Trainer's real epoch (``Trainer.train_epoch``: DataLoader from the
preprocessed image cache with N loader workers, the strategy's forward and loss, ``TrainStep``'s
autocast / loss scaler / clipping / optimizer step, the LR schedule and ``after_step``) against a bare
``loss = head.loss(model(x)); loss.backward(); opt.step()`` on one batch already on the GPU; the ratio
of the two; the share of our epoch spent waiting for data; peak CUDA memory of each. The first epoch
(cuDNN autotuning, torch.compile, worker start-up) is not timed. Targets: ratio >= 0.95, data wait < 5 %.

Without CUDA it runs a 2-step CPU smoke of the same code on a tiny model and says that no GPU figure
was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr_automl import config
from cxr_automl.plugin import compat
from cxr_automl.train.loop import Trainer

#: (backbone, head) -> (image size, batch) from the papers (shared/METHODS.md): SPFT's RAD-DINO at 518 px
#: with batch 64 (classification) / 16 (detection) / 8 (segmentation) and its SAM2 on Hiera at 1024;
#: Foundation X's Swin-B at 224 with batch 24; MLVICX's ResNet18 at 224 with batch 64
PAPER = {
    ("rad_dino", "mlp"): (518, 64), ("rad_dino", "yolov8"): (518, 16), ("rad_dino", "upernet"): (518, 8),
    ("swin_b", "linear"): (224, 24), ("swin_b", "dino"): (224, 24), ("swin_b", "upernet"): (224, 24),
    ("resnet18", "linear"): (224, 64), ("hiera", "sam2"): (1024, 8),
}
QUICK = [("rad_dino", "mlp"), ("swin_b", "linear"), ("resnet18", "linear")]
SMOKE = ("resnet_tiny", "linear", 64, 2)


@dataclass
class Row:
    cell: str
    size: int
    batch: int
    precision: str
    compile: bool
    workers: int
    ours: float = float("nan")  # images/s
    bare: float = float("nan")
    wait: float = float("nan")  # share of our epoch waiting for data
    peak_ours: float = float("nan")  # GiB
    peak_bare: float = float("nan")
    note: str = ""


def overrides(backbone: str, head: str, size: int, batch: int, precision: str, compile_: bool, workers: int,
              steps: int, cache: Path) -> list[str]:
    b_cfg = config.compose([f"backbone={backbone}"])["backbone"]
    weights = []  # random weights: the speed is the same and nothing is downloaded
    if "weights" in b_cfg:
        weights.append("backbone.weights=null")
    if "pretrained" in b_cfg:
        weights.append("backbone.pretrained=false")
    tiny = ["backbone.width=8"] if backbone == "resnet_tiny" else []
    return [f"backbone={backbone}", f"head={head}", f"dataset.task={compat.head_task(head)}", "dataset=synthetic_cxr",
            f"dataset.image_size={size}", f"backbone.image_size={size}", f"dataset.n_train={batch * steps}",
            f"dataset.n_val={batch}", f"dataset.n_test={batch}", f"dataset.cache_dir={cache}", "dataset.augment=false",
            "strategy=finetune", "strategy.epochs=2", f"trainer.batch_size={batch}", f"trainer.precision={precision}",
            f"trainer.compile={str(compile_).lower()}", f"trainer.num_workers={workers}", "trainer.progress=false",
            *weights, *tiny]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(row: Row, cfg: dict, run_dir: Path, steps: int) -> None:
    """Fill ``row``: one untimed epoch, one timed epoch of the Trainer, then the bare step on the same model."""
    trainer = Trainer(cfg, run_dir)
    device = trainer.device
    plan = trainer.strategy.plan(0, trainer.model)
    trainer.train_epoch(plan)  # warm-up: autotuning, compile, loader workers start
    trainer.epoch = 1
    reset_peak(device)
    sync(device)
    stats = trainer.train_epoch(plan)
    sync(device)
    row.ours, row.wait, row.peak_ours = stats["train/images_per_s"], stats["train/data_wait_share"], peak_gib(device)

    model, step = trainer.model, trainer.train_step
    batch = next(iter(trainer.train_loader()))
    images = step.images(batch)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    del trainer.optimizer  # the bare step holds its own optimizer state, not both

    def bare_step() -> None:
        with step.autocast():
            loss = model.head.loss(model(images), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(min(3, steps)):
        bare_step()
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        bare_step()
    sync(device)
    row.bare = steps * len(images) / (time.perf_counter() - t0)
    row.peak_bare = peak_gib(device)


def run(cells: list[tuple[str, str, int, int]], settings: list[tuple[str, bool]], workers: int, steps: int,
        compile_cells: set[str] | None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for backbone, head, size, batch in cells:
            combo = compat.check(backbone, head)
            for precision, compile_ in settings:
                name = f"{backbone}×{head}"
                row = Row(name, size, batch, precision, compile_, workers)
                rows.append(row)
                if not combo.ok:
                    row.note = combo.reason
                    continue
                if compile_ and compile_cells is not None and name not in compile_cells:
                    rows.pop()
                    continue
                cfg = config.compose(overrides(backbone, head, size, batch, precision, compile_, workers, steps, cache))
                try:
                    measure(row, cfg, Path(tmp) / f"run{len(rows)}", steps)
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of GPU memory"
                except Exception as exc:  # one cell's failure must not lose the table
                    row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                print(f"  measured {name} {precision} compile={compile_}: {row.note or f'{row.ours:.1f} img/s'}",
                      file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    head = (f"{'backbone×head':<20} {'px':>5} {'batch':>5} {'prec':>5} {'compile':>7} {'ours img/s':>10} "
            f"{'bare img/s':>10} {'ours/bare':>9} {'data wait':>9} {'peak GiB ours':>13} {'bare':>6}  note")
    lines = [head, "-" * len(head)]
    def f(value: float, width: int, spec: str, suffix: str = "") -> str:
        return f"{'-':>{width}}" if math.isnan(value) else f"{format(value, spec) + suffix:>{width}}"

    for r in rows:
        lines.append(f"{r.cell:<20} {r.size:>5} {r.batch:>5} {r.precision:>5} {('on' if r.compile else 'off'):>7} "
                     f"{f(r.ours, 10, '.1f')} {f(r.bare, 10, '.1f')} {f(r.ours / r.bare, 9, '.3f')} "
                     f"{f(100 * r.wait, 9, '.1f', '%')} {f(r.peak_ours, 13, '.2f')} {f(r.peak_bare, 6, '.2f')}  {r.note}")
    return "\n".join(lines)


def parse_cells(items: list[str]) -> list[tuple[str, str, int, int]]:
    out = []
    for item in items:
        parts = item.split(":")
        if len(parts) not in (2, 4):
            raise SystemExit(f"--cells {item!r}: use BACKBONE:HEAD or BACKBONE:HEAD:SIZE:BATCH")
        b, h = parts[:2]
        size, batch = (int(parts[2]), int(parts[3])) if len(parts) == 4 else PAPER.get((b, h), (224, 32))
        out.append((b, h, size, batch))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 cells, bf16 + fp32, compile on the first cell only")
    ap.add_argument("--cells", nargs="*", help="BACKBONE:HEAD[:SIZE:BATCH] (default: every paper cell)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 20, quick 12)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers (default: this process's CPUs minus one, at most 8)")
    ap.add_argument("--precision", nargs="*", default=["bf16", "32"], choices=["bf16", "32", "16"])
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--cpu-smoke", action="store_true", help="the 2-step CPU smoke even where CUDA exists (CI)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_smoke or not torch.cuda.is_available():
        b, h, size, batch = SMOKE
        print(f"{'--cpu-smoke' if args.cpu_smoke else 'CUDA is not available'}: running a 2-step CPU smoke of the "
              "benchmark's code path.", flush=True)
        rows = run([(b, h, size, batch)], [("32", False)], workers=0, steps=2, compile_cells=None)
        print(table(rows))
        print("No GPU figure was measured (CPU smoke only); run this on a CUDA machine for the GPU table.")
        return 0 if all(not r.note for r in rows) else 1
    torch.backends.cudnn.benchmark = True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers if args.workers is not None else max(0, min(8, cpus - 1))
    if args.quick:
        cells = parse_cells(args.cells) if args.cells else [(b, h, *PAPER[(b, h)]) for b, h in QUICK]
        steps, compile_cells = args.steps or 12, {f"{cells[0][0]}×{cells[0][1]}"}
    else:
        cells = parse_cells(args.cells) if args.cells else [(b, h, s, n) for (b, h), (s, n) in PAPER.items()]
        steps, compile_cells = args.steps or 20, None
    compiles = [False] if args.no_compile else [False, True]
    settings = [(p, c) for c in compiles for p in args.precision]
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}: {len(cells)} cell(s), {steps} timed steps each, {workers} loader workers",
          flush=True)
    rows = run(cells, settings, workers, steps, compile_cells)
    print(table(rows))
    print(f"measured in {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name()} "
          f"(torch {torch.__version__}); targets: ours/bare >= 0.95, data wait < 5 %")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
