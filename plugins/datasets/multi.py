"""Several datasets as one bundle, for strategies that train across datasets (Foundation X).

Each split is the concatenation of the members' splits. Label columns are the union
``<member>/<class>``; an item carries its own member's labels in its columns and NaN (unknown)
everywhere else, so the masked BCE of a classification head only ever learns a member's classes
from that member's images, and validation reports ``val/auc/<member>/<class>``. Items also get
``source`` (the member's position). ``extras['members']`` maps each member to its index range in
every split and its label columns.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from cxr_automl.config import ConfigError
from cxr_automl.plugin.interfaces import DatasetBundle
from cxr_automl.plugin.targets import mask_boxes

SPLITS = ("train", "val", "test")


class ConcatSplit(torch.utils.data.Dataset):
    """One split of every member, labels moved into the union columns."""

    def __init__(self, parts: list[torch.utils.data.Dataset], columns: list[list[int]], n_columns: int):
        self.parts, self.columns, self.n_columns = parts, columns, n_columns
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            if hasattr(p, "set_epoch"):
                p.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = bisect.bisect_right(self.starts, i) - 1
        item = dict(self.parts[k][i - self.starts[k]])
        labels = torch.full((self.n_columns,), float("nan"))
        labels[self.columns[k]] = item["labels"].float()
        item["labels"], item["source"] = labels, k
        return item


class StructureSplit(torch.utils.data.Dataset):
    """One split seen as one anatomical structure: its mask (1, H, W), the box around it (class 0,
    none when the mask is empty) and the label "structure present"."""

    def __init__(self, split: torch.utils.data.Dataset, index: int):
        self.split, self.index = split, index

    def __len__(self) -> int:
        return len(self.split)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.split, "set_epoch"):
            self.split.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.split[i])
        mask = item["masks"][self.index:self.index + 1]
        boxes, present = mask_boxes(mask)  # (1, 4), (1,)
        box = boxes[present].float()
        item.update(masks=mask, boxes=box, box_labels=torch.zeros(len(box), dtype=torch.int64),
                    labels=torch.tensor([float(present[0])]))
        return item


def select_structure(bundle: DatasetBundle, structure: str, where: str = "structure") -> DatasetBundle:
    """``bundle`` as a one-structure dataset (Foundation X's Table 8 treats heart, left lung and right
    lung as separate datasets): masks, boxes and labels of ``structure`` only."""
    names = list(bundle.extras.get("structures") or [])
    if structure not in names:
        raise ConfigError(f"{where}={structure!r}: the dataset's masks are "
                          f"{', '.join(names) if names else 'absent (it has no structures)'}")
    k = names.index(structure)
    splits = {s: StructureSplit(getattr(bundle, s), k) for s in SPLITS}
    return DatasetBundle(train=splits["train"], val=splits["val"], test=splits["test"], class_names=[structure],
                         task=bundle.task, channels=bundle.channels,
                         extras={"structures": [structure], "source_structures": names, "box_classes": [structure],
                                 "tasks": ["classification", "detection", "segmentation"]})


def compose(members: dict[str, DatasetBundle]) -> DatasetBundle:
    """One bundle over ``members`` (name → bundle); all must give classification labels, the same
    number of channels and the same image size (one batch mixes nothing, but one model sees all)."""
    names = list(members)
    if not names:
        raise ValueError("compose() needs at least one dataset")
    first = members[names[0]]
    size = first.train[0]["image"].shape
    for name, b in members.items():
        if b.channels != first.channels or b.train[0]["image"].shape != size:
            raise ConfigError(f"dataset {name!r} gives images of shape {tuple(b.train[0]['image'].shape)}, "
                              f"{names[0]!r} gives {tuple(size)}; use one image size and channel count for "
                              "every dataset")
    class_names, columns = [], []
    for name in names:
        cols = list(range(len(class_names), len(class_names) + len(members[name].class_names)))
        columns.append(cols)
        class_names.extend(f"{name}/{c}" for c in members[name].class_names)
    n = len(class_names)
    splits = {s: ConcatSplit([getattr(members[m], s) for m in names], columns, n) for s in SPLITS}
    extras: dict[str, Any] = {"members": {}}
    for s in SPLITS:
        mats = []
        for k, name in enumerate(names):
            own = members[name].label_matrix(s)
            full = torch.full((len(own), n), float("nan"))
            full[:, columns[k]] = own
            mats.append(full)
        extras[f"{s}_labels"] = torch.cat(mats).numpy()
    for k, name in enumerate(names):
        extras["members"][name] = {"columns": columns[k],
                                   **{s: (splits[s].starts[k], splits[s].starts[k + 1]) for s in SPLITS}}
    return DatasetBundle(train=splits["train"], val=splits["val"], test=splits["test"], class_names=class_names,
                         task="classification", channels=first.channels, extras=extras)
