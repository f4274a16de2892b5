"""Cost of the papers' strategies (never asserted in tests).

1. mlvicx: one pretraining step (two views, inline context bottlenecks, two expanders, VICReg, LARS)
   vs one supervised fine-tuning step on the same backbone and batch; the share spent drawing views.
   lock_release: one classification step with the student-teacher on vs off (the teacher's extra forward).
2. lock_release, the issue's target: peak memory with 6 localization decoders vs 1 (target <= 1.2x, thanks
   to keeping inactive decoders off the accelerator) and wall time per cycle. Each arm runs two
   cycles (Lock + Release per dataset, evaluation after each Release; the time is the second cycle's)
   in its own process, so no arm inherits another's allocations:
     - on CUDA: torch.cuda.max_memory_allocated over the whole run (setup included);
     - always: the process's peak resident set size (RSS) — on a CPU-only machine the model lives in
       RAM whatever the placement, so RSS counts every decoder: offloading has nothing to move there;
     - always: "device-resident state", the bytes of parameters, gradients and AdamW moments the
       placement keeps on the training device at each epoch (max over epochs; activations excluded) —
       what an accelerator would hold besides activations, computed from where each part actually is
       (on CUDA) or would be (on CPU, from the same placement rule).
   Arms: 1 decoder (offload on), 6 decoders (offload on), 6 decoders (offload off).

    python bench/strategies.py [--repeats 5] [--backbone resnet_tiny] [--batch 32] [--size 96] [--only lock_release]
    python bench/strategies.py --quick      # tiny sizes: checks that the script runs, numbers mean little
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from cxr_automl import config
from cxr_automl.train.loop import Callback, Trainer
from cxr_automl.train.runtime import apply_plan


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


# ----------------------------------------------------------------------------------- lock_release memory
def organ_sets(n: int) -> str:
    """``n`` localization datasets of the same size (the run's images seen through one organ each)."""
    organs = ("heart", "left_lung", "right_lung")
    return "[" + ", ".join(f"{{name: d{i}, tasks: [loc], structure: {organs[i % 3]}}}" for i in range(n)) + "]"


def state_bytes(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Parameters + gradients of the trainable ones + AdamW moments that exist for them."""
    total = 0
    for p in params:
        total += p.numel() * p.element_size() * (2 if p.requires_grad else 1)
        for v in optimizer.state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


class ArmMeter(Callback):
    """After the first step of every epoch: bytes of model state on the training device; and when
    each epoch ended (validation included), for the wall time of a cycle."""

    def __init__(self) -> None:
        self.peak, self._measured = 0, -1
        self.ended: list[float] = []
        self.evaluating: list[float] = []  # per epoch: from the last training batch to the epoch's end
        self._last_batch = 0.0

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.ended.append(time.perf_counter())
        self.evaluating.append(self.ended[-1] - self._last_batch)

    def on_batch_end(self, trainer: Trainer, loss: float) -> None:
        self._last_batch = time.perf_counter()
        if self._measured == trainer.epoch:
            return
        self._measured = trainer.epoch
        from cxr_automl_plugins.strategies.foundation_parts import all_components, component, resident
        model, strategy = trainer.model, trainer.strategy
        if trainer.device.type != "cpu":  # where the parts are
            params = [p for p in model.parameters() if p.device.type == trainer.device.type]
        else:  # where the placement rule would put them with an accelerator
            row = strategy.rows[trainer.epoch]
            keep = resident(row.components, strategy.teacher) if strategy.offload else set(all_components(model))
            mods = [model.adapter, model.backbone, *([model.teacher.copies["backbone"]] if strategy.teacher else []),
                    *(component(model, n) for n in keep)]
            seen, params = set(), []
            for m in mods:
                for p in m.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        self.peak = max(self.peak, state_bytes(params, trainer.optimizer))


def memory_arm(args: argparse.Namespace, n_decoders: int, offload: bool) -> dict:
    """One arm, in this process: two cycles of lock_release on ``n_decoders`` localization datasets;
    the wall time is the second cycle's (first-call costs — lazy imports, allocator warm-up — land in
    the first), memory is the peak over both."""
    import resource
    with tempfile.TemporaryDirectory() as tmp:
        meter = ArmMeter()
        trainer = Trainer(config.compose([*common_overrides(args), "strategy=lock_release",
                                          f"strategy.datasets={organ_sets(n_decoders)}",
                                          f"strategy.offload={str(offload).lower()}", "strategy.cycles=2"]),
                          tmp, callbacks=[meter])
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        trainer.fit()
        per_cycle = trainer.strategy.epochs // 2
        wall = meter.ended[-1] - meter.ended[per_cycle - 1]
        params = sum(p.numel() for p in trainer.model.parameters())
        return {"decoders": n_decoders, "offload": offload, "device": trainer.device.type, "epochs": per_cycle,
                "cycle_s": wall, "per_dataset_s": wall / n_decoders, "params": params,
                "eval_share": sum(meter.evaluating[per_cycle:]) / wall,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "resident_state_mib": meter.peak / 2**20,
                "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def run_arm_process(args: argparse.Namespace, n_decoders: int, offload: bool) -> dict:
    cmd = [sys.executable, __file__, "--arm", f"{n_decoders},{int(offload)}", *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm {n_decoders} decoders offload={offload} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lock_release_memory(args: argparse.Namespace) -> None:
    arms = [run_arm_process(args, n, off) for n, off in ((1, True), (6, True), (6, False))]
    one, six, six_all = arms
    device = one["device"]
    print(f"lock_release, two cycles per arm (time: the second), each arm in its own process (device: {device})")
    for a in arms:
        cuda = f"   CUDA peak {a['cuda_peak_mib']:8.1f} MiB" if a["cuda_peak_mib"] is not None else ""
        print(f"  {a['decoders']} decoder(s), offload {'on ' if a['offload'] else 'off'}: {a['epochs']:2d} epochs per cycle, "
              f"{a['cycle_s']:7.1f} s per cycle ({a['per_dataset_s']:5.1f} s per dataset, "
              f"{a['eval_share']:.0%} evaluating), "
              f"{a['params'] / 1e6:6.2f} M params, peak RSS {a['peak_rss_mib']:8.1f} MiB, "
              f"device-resident state {a['resident_state_mib']:7.2f} MiB{cuda}")
    ratio = six["resident_state_mib"] / one["resident_state_mib"]
    print(f"  6 vs 1 decoders, device-resident state: {ratio:.2f}x with offloading (target <= 1.2x), "
          f"{six_all['resident_state_mib'] / one['resident_state_mib']:.2f}x without")
    print("  (every Release epoch evaluates every dataset's task, as Table 8 does, so evaluation per cycle grows "
          "with the square of the number of datasets)")
    if six["cuda_peak_mib"] is not None:
        print(f"  6 vs 1 decoders, CUDA peak: {six['cuda_peak_mib'] / one['cuda_peak_mib']:.2f}x with offloading, "
              f"{six_all['cuda_peak_mib'] / one['cuda_peak_mib']:.2f}x without")
    else:
        print("  no accelerator here: offloading moves nothing (device and offload device are both the CPU), so\n"
              f"  peak RSS holds every decoder ({six['peak_rss_mib'] / one['peak_rss_mib']:.2f}x); the device-resident "
              "figure is what the placement rule would keep on an accelerator, activations excluded.")


def common_overrides(args: argparse.Namespace) -> list[str]:
    out = [f"backbone={args.backbone}", f"trainer.batch_size={args.batch}", f"dataset.image_size={args.size}",
           f"dataset.n_train={max(args.batch, args.n_per_dataset)}", f"dataset.n_val={args.n_eval}",
           f"dataset.n_test={args.n_eval}", "trainer.progress=false", "head=linear"]
    if args.backbone == "resnet_tiny":
        out += [f"backbone.image_size={args.size}", f"backbone.width={args.width}"]
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--width", type=int, default=16, help="resnet_tiny width")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--expander-dim", type=int, default=2048)
    ap.add_argument("--n-per-dataset", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--only", choices=("steps", "lock_release"), default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: "N,OFFLOAD" in a child process
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.width, args.batch, args.size, args.expander_dim = 1, 8, 4, 64, 64
        args.n_per_dataset, args.n_eval = 8, 4
    args.passthrough = [f"--backbone={args.backbone}", f"--width={args.width}", f"--batch={args.batch}",
                        f"--size={args.size}", f"--n-per-dataset={args.n_per_dataset}", f"--n-eval={args.n_eval}"]
    return args


def main() -> None:
    args = parse()
    if args.arm:
        n, offload = args.arm.split(",")
        print(json.dumps(memory_arm(args, int(n), bool(int(offload)))))
        return
    if args.only in (None, "steps"):
        step_costs(args)
    if args.only in (None, "lock_release"):
        lock_release_memory(args)


def step_costs(args: argparse.Namespace) -> None:
    common = common_overrides(args)
    with tempfile.TemporaryDirectory() as tmp:
        # ---- mlvicx vs supervised ----------------------------------------------------------------
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

        # ---- lock_release: teacher on/off (classification step) --------------------------------
        def lr_trainer(teacher: bool, tag: str) -> Trainer:
            return build([*common, "strategy=lock_release", "strategy.datasets=[{name: d0, tasks: [cls]}]",
                          "strategy.lock_classification=true", f"strategy.teacher={str(teacher).lower()}"],
                         f"{tmp}/{tag}")

        on, off = lr_trainer(True, "on"), lr_trainer(False, "off")
        images, labels = batch_of(on, args.batch)
        t = median_alternating({"on": lambda: step_time(on, images, labels, epoch=1),
                                "off": lambda: step_time(off, images, labels, epoch=1)}, args.repeats)
        print(f"lock_release step teacher on {t['on'] * 1e3:8.1f} ms   off {t['off'] * 1e3:8.1f} ms   "
              f"ratio {t['on'] / t['off']:.2f}x")


if __name__ == "__main__":
    main()
