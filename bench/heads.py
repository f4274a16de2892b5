"""Per-step time and peak memory of every backbone × head, and our dense paths' overhead.

Table: one full fine-tuning step (forward, task loss, backward, AdamW step) at batch 2 on synthetic CXRs
at each backbone's own resolution (``--size paper``: ResNet-50 and Swin-B 224 px, RAD-DINO 518 px;
SAM2's Hiera 1024 px, YOLOv8n 640 px; ``--size tiny``: the ``*_tiny`` variants at 64 px). Each pair runs
in its own process so its peak resident memory (VmHWM, reset after building) is its own.

Overhead: our YOLOv8 and UperNet paths (``CXRModel`` + head + strategy loss, what ``cxr-automl train``
runs per step) against the bare libraries doing the same step: timm's ``features_only`` model of the
same backbone, ultralytics' ``Detect`` + ``v8DetectionLoss`` / transformers' ``UperNetHead`` + the same
BCE+Dice, called directly. Measured alternately in one process; ratio = ours / bare (target <= 1.15).

    python bench/heads.py [--size paper|tiny] [--steps 3] [--backbones resnet50,swin_b] [--heads yolov8]
    python bench/heads.py --overhead-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

PAPER = {"resnet50": [], "swin_b": [], "rad_dino": ["backbone.weights=null"],
         "hiera": ["backbone.weights=null"], "yolov8n": []}  # SAM2's Hiera at 1024 px, YOLOv8n at 640 px
TINY = {"resnet_tiny": ["backbone.width=8", "backbone.image_size=64"], "swin_tiny": [], "rad_dino_tiny": [],
        "hiera_tiny": [], "yolov8_tiny": []}
HEADS = ["linear", "mlp", "upernet", "yolov8", "dino", "sam2"]
#: at 64 px the tiny backbones' last three maps have 84 positions: fewer DETR queries than that
TINY_HEADS = {"dino": ["head.num_queries=30"]}


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_batch(task: str, size: int, n: int = 2) -> tuple[dict, object]:
    """``n`` synthetic CXRs at ``size`` px with the task's targets, and a matching DatasetBundle."""
    from cxr_automl.plugin.interfaces import DatasetBundle
    from cxr_automl.train.loop import collate
    from cxr_automl_plugins.datasets.synthetic_cxr import CLASSES, STRUCTURES, SyntheticSplit, generate
    split = SyntheticSplit(generate(n, size, 0, "train"), "train", 0, augment=False)
    names = list(STRUCTURES if task == "segmentation" else CLASSES)
    bundle = DatasetBundle(train=split, val=split, test=split, class_names=names, task=task, channels=1)
    return collate([split[i] for i in range(n)]), bundle


def build(backbone: str, head: str, extra: list[str]):
    from cxr_automl import config
    from cxr_automl.plugin import compat, registry
    from cxr_automl.train.model import build_model
    task = compat.head_task(head)
    cfg = config.compose([f"backbone={backbone}", f"head={head}", f"dataset.task={task}", "strategy=finetune",
                          *extra])
    size = cfg["backbone"].get("image_size")
    if size is None:  # a backbone without an image_size option: ask an instance
        b_cfg = dict(cfg["backbone"])
        size = registry.build("backbone", b_cfg.pop("name"), **b_cfg).input_spec.size
    batch, data = make_batch(task, size)
    model = build_model(cfg["backbone"], cfg["head"], data)
    s_cfg = dict(cfg["strategy"])
    strategy = registry.build("strategy", s_cfg.pop("name"), **s_cfg)
    strategy.setup(model, data)
    return model, strategy, batch, size


def one_step(model, strategy, opt, batch) -> float:
    t0 = time.perf_counter()
    loss = strategy.loss(model, model(batch["image"]), batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def run_one(backbone: str, head: str, extra: list[str], steps: int) -> dict:
    torch.manual_seed(0)
    model, strategy, batch, size = build(backbone, head, extra)
    model.train()
    opt = torch.optim.AdamW(strategy.param_groups(model))
    idle = _rss_mb("VmRSS")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: peak of the steps only
    except OSError:
        pass
    one_step(model, strategy, opt, batch)  # warm-up (allocator, lazy loss construction)
    times = [one_step(model, strategy, opt, batch) for _ in range(steps)]
    return {"backbone": backbone, "head": head, "size": size, "step_s": statistics.median(times),
            "peak_mb": _rss_mb("VmHWM"), "idle_mb": idle,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


# ------------------------------------------------------------------------------------------------ overhead
def bare_features(backbone_name: str, ours: torch.nn.Module) -> torch.nn.Module:
    """timm's ``features_only`` model of the same backbone: by timm name, or (a variant timm has no name
    for, such as ``resnet_tiny``) timm's feature wrapper around a copy of our network."""
    import copy

    import timm
    if timm.is_model(backbone_name):
        return timm.create_model(backbone_name, features_only=True, pretrained=False)
    return timm.models.FeatureListNet(copy.deepcopy(ours))


def bare_step_factory(head: str, net: torch.nn.Module, size: int, batch: dict, num_classes: int, width: int):
    """The same step with the libraries called directly (no CXRModel, InputAdapter, target checks)."""
    import torch.nn.functional as F
    chans = net.feature_info.channels()
    images = batch["image"].expand(-1, 3, -1, -1).contiguous()
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if head == "upernet":
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetHead

        from cxr_automl.plugin.targets import soft_dice_loss
        # the four stage outputs (strides 4-32) our backbones give; features_only also returns the stem's
        dec = UperNetHead(UperNetConfig(hidden_size=width, num_labels=num_classes), in_channels=chans[-4:])
        masks = batch["masks"].float()

        def loss_fn():
            logits = F.interpolate(dec(net(images)[-4:]), size=masks.shape[-2:], mode="bilinear",
                                   align_corners=False)
            return (F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean((0, 2, 3))
                    + soft_dice_loss(logits.sigmoid(), masks, dims=(0, 2, 3))).mean()
        modules = [net, dec]
    else:
        from types import SimpleNamespace

        from ultralytics.nn.modules import Conv, Detect
        from ultralytics.utils.loss import v8DetectionLoss
        proj = torch.nn.ModuleList([Conv(c, width, 1) for c in chans[-3:]])
        det = Detect(nc=num_classes, ch=(width,) * 3)
        holder = torch.nn.Module()
        holder.model, holder.args = torch.nn.ModuleList([det]), SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
        feats0 = net(images)[-3:]
        det.stride = torch.tensor([size / f.shape[-2] for f in feats0])
        crit = v8DetectionLoss(holder)
        h = batch["image"].shape[-1]
        boxes = torch.cat(list(batch["boxes"])) / h
        targets = {"batch_idx": torch.cat([torch.full((len(b),), float(i)) for i, b in enumerate(batch["boxes"])]),
                   "cls": torch.cat(list(batch["box_labels"])).float(),
                   "bboxes": torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)}

        def loss_fn():
            x = [p(f) for p, f in zip(proj, net(images)[-3:])]
            return crit(det.forward_head(x, **det.one2many), targets)[0].sum() / len(images)
        modules = [net, proj, det]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for m in modules:
        m.train()

    def step() -> float:
        t0 = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0
    return step


def overhead(backbone: str, extra: list[str], steps: int, repeats: int) -> list[str]:
    lines = []
    for head, width_key in (("yolov8", "head.width"), ("upernet", "head.hidden")):
        torch.manual_seed(0)
        model, strategy, batch, size = build(backbone, head, [*extra, f"{width_key}=128"])
        model.train()
        opt = torch.optim.AdamW(strategy.param_groups(model))
        timm_name = model.backbone.net.default_cfg.get("architecture", backbone) \
            if hasattr(model.backbone.net, "default_cfg") else backbone
        bare = bare_step_factory(head, bare_features(timm_name, model.backbone.net), size, batch,
                                 model.head.num_classes, 128)
        one_step(model, strategy, opt, batch), bare()  # warm-up both
        ours, ref = [], []
        for _ in range(repeats):  # alternate so machine load hits both alike
            ref.append(statistics.median([bare() for _ in range(steps)]))
            ours.append(statistics.median([one_step(model, strategy, opt, batch) for _ in range(steps)]))
        o, r = statistics.median(ours), statistics.median(ref)
        lines.append(f"{backbone:>10} {head:>8} {size:>5}px  bare {r:7.3f} s/step  ours {o:7.3f} s/step  "
                     f"ratio ours/bare {o / r:5.3f}  (target <= 1.15)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backbones", default=None, help="comma-separated; default: all of --size")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--overhead-backbone", default="resnet50")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("BACKBONE", "HEAD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    table = PAPER if args.size == "paper" else TINY
    if args.one:
        extra = table.get(args.one[0], []) + (TINY_HEADS.get(args.one[1], []) if args.size == "tiny" else [])
        print(json.dumps(run_one(*args.one, extra, args.steps)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 2, {args.steps} timed steps")
    if not args.overhead_only:
        backbones = args.backbones.split(",") if args.backbones else list(table)
        print(f"{'backbone':>14} {'head':>8} {'size':>5} {'params':>8} {'s/step':>8} {'peak MB':>8} {'idle MB':>8}")
        for b in backbones:
            for h in args.heads.split(","):
                proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                                       "--one", b, h], capture_output=True, text=True)
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{b:>14} {h:>8}  failed: {err}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{b:>14} {h:>8} {r['size']:>5} {r['params_m']:>7.1f}M {r['step_s']:>8.3f} "
                      f"{r['peak_mb']:>8.0f} {r['idle_mb']:>8.0f}", flush=True)
    print("overhead of our dense paths vs the bare libraries (same backbone, head and loss):")
    extra = PAPER.get(args.overhead_backbone, TINY.get(args.overhead_backbone, []))
    for line in overhead(args.overhead_backbone, extra, args.steps, args.repeats):
        print(line, flush=True)


if __name__ == "__main__":
    main()
