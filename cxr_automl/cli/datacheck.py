"""``cxr-automl data check``: load a dataset configuration the way training will, and summarise it.

The dataset is built with ``on_error=skip`` (when the plugin has that option) so every problem is
counted instead of stopping at the first; the summary says what ``on_error=raise`` would stop at.
Building also builds the preprocessed cache, so a check doubles as the cache warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_automl import config
from cxr_automl.plugin import registry
from cxr_automl.plugin.interfaces import DatasetBundle

SPLITS = ("train", "val", "test")


@dataclass
class CheckReport:
    dataset: str
    task: str
    images: dict[str, int]  # split -> usable images
    patients: dict[str, int | None]
    skipped: dict[str, int]  # problem kind -> count
    examples: list[str]
    classes: list[str]
    labels: dict[str, dict[str, dict[str, int]]]  # split -> class -> {pos, neg, unknown}
    boxes: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> boxes
    images_with_boxes: dict[str, int] = field(default_factory=dict)
    masks: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> structure -> share non-empty
    mask_samples: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cache: str | None = None

    @property
    def ok(self) -> bool:
        """No row was skipped (``on_error=raise`` would load this dataset)."""
        return not self.skipped

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"ok": self.ok}


def check(overrides: list[str] | tuple[str, ...] = (), mask_samples: int = 200) -> CheckReport:
    """Build the configured dataset and summarise it (see the module docstring)."""
    cfg = config.compose(list(overrides), check_task=False)  # the dataset alone: any head
    node = dict(cfg["dataset"])
    name = node.pop("name")
    if "on_error" in registry.factory_params(registry.load("dataset", name)):
        node["on_error"] = "skip"
    data: DatasetBundle = registry.build("dataset", name, **node)
    report = data.extras.get("report", {})
    rep = CheckReport(dataset=name, task=data.task, images={s: len(getattr(data, s)) for s in SPLITS},
                      patients={s: (len(data.extras[f"{s}_patients"]) if f"{s}_patients" in data.extras else None)
                                for s in SPLITS},
                      skipped=dict(report.get("skipped", {})), examples=list(report.get("examples", [])),
                      classes=list(data.class_names), labels={}, cache=data.extras.get("cache"))
    for s in SPLITS:
        lab = np.asarray(data.label_matrix(s), np.float32).reshape(len(getattr(data, s)), -1)
        rep.labels[s] = {c: {"pos": int(np.sum(lab[:, k] == 1)), "neg": int(np.sum(lab[:, k] == 0)),
                             "unknown": int(np.isnan(lab[:, k]).sum())} for k, c in enumerate(data.class_names)}
        empty = [c for c, v in rep.labels[s].items() if v["pos"] == 0]
        if empty:
            rep.warnings.append(f"{s}: no positive {', '.join(empty)} (no AUC for {'it' if len(empty) == 1 else 'them'})")
    _boxes_and_masks(data, rep, mask_samples)
    for s in ("val", "test"):
        if rep.patients[s] is not None and set(data.extras[f"{s}_patients"]) & set(data.extras["train_patients"]):
            rep.warnings.append(f"patients shared between train and {s}")
    return rep


def _boxes_and_masks(data: DatasetBundle, rep: CheckReport, mask_samples: int) -> None:
    """Boxes from the records' box labels when the loader exposes them, masks from sampled items."""
    box_names = data.extras.get("box_classes") or data.class_names
    for s in SPLITS:
        split = getattr(data, s)
        if not len(split):
            continue
        per_image = data.extras.get(f"{s}_box_labels")
        first = split[0]
        if per_image is None and "box_labels" in first:
            per_image = [split[i]["box_labels"].numpy() for i in range(len(split))]
        if per_image is not None and ("box_labels" in first):
            counts = np.bincount(np.concatenate([np.asarray(b, np.int64) for b in per_image] or [np.zeros(0, np.int64)]),
                                 minlength=len(box_names))
            rep.boxes[s] = {n: int(counts[k]) for k, n in enumerate(box_names)}
            rep.images_with_boxes[s] = int(sum(len(b) > 0 for b in per_image))
        if "masks" in first:
            idx = np.unique(np.linspace(0, len(split) - 1, min(mask_samples, len(split))).astype(int))
            present = np.stack([split[int(i)]["masks"].flatten(1).any(1).numpy() for i in idx])
            names = data.extras.get("structures") or [f"mask_{k}" for k in range(present.shape[1])]
            rep.masks[s] = {n: float(present[:, k].mean()) for k, n in enumerate(names)}
            rep.mask_samples[s] = len(idx)


def render(rep: CheckReport) -> list:
    """rich renderables: overview, labels per class and split, boxes, masks, problems."""
    from rich.table import Table
    out: list = []
    t = Table(title=f"dataset {rep.dataset} (task {rep.task})")
    for col in ("split", "images", "patients", *(["images with boxes"] if rep.images_with_boxes else [])):
        t.add_column(col, justify="right" if col != "split" else "left")
    for s in SPLITS:
        t.add_row(s, str(rep.images[s]), "?" if rep.patients[s] is None else str(rep.patients[s]),
                  *([str(rep.images_with_boxes.get(s, 0))] if rep.images_with_boxes else []))
    out.append(t)
    t = Table(title="labels: positive / negative / unknown")
    t.add_column("class")
    for s in SPLITS:
        t.add_column(s, justify="right")
    for c in rep.classes:
        cells = []
        for s in SPLITS:
            v = rep.labels[s][c]
            text = f"{v['pos']} / {v['neg']} / {v['unknown']}"
            cells.append(f"[red]{text}[/red]" if v["pos"] == 0 else text)
        t.add_row(c, *cells)
    out.append(t)
    if rep.boxes:
        t = Table(title="boxes per class")
        t.add_column("class")
        for s in SPLITS:
            t.add_column(s, justify="right")
        for c in next(iter(rep.boxes.values())):
            t.add_row(c, *[str(rep.boxes.get(s, {}).get(c, 0)) for s in SPLITS])
        out.append(t)
    if rep.masks:
        t = Table(title="masks: share of sampled images with a non-empty mask")
        t.add_column("structure")
        for s in SPLITS:
            t.add_column(f"{s} (n={rep.mask_samples.get(s, 0)})", justify="right")
        for c in next(iter(rep.masks.values())):
            t.add_row(c, *[f"{rep.masks.get(s, {}).get(c, 0):.2f}" for s in SPLITS])
        out.append(t)
    found = sum(rep.images.values())
    lines = [f"images usable: {found}; missing: {rep.skipped.get('missing', 0)}; "
             f"unreadable: {rep.skipped.get('unreadable', 0)}; other skipped rows: "
             f"{sum(v for k, v in rep.skipped.items() if k not in ('missing', 'unreadable'))}"]
    if rep.skipped:
        lines.append("[red]on_error=raise would stop at the first of:[/red] " + "; ".join(
            f"{n} {k}" for k, n in sorted(rep.skipped.items())))
        lines += [f"  e.g. {e}" for e in rep.examples]
    lines += [f"[yellow]warning:[/yellow] {w}" for w in rep.warnings]
    if rep.cache:
        lines.append(f"cache: {rep.cache}")
    out.extend(lines)
    return out
