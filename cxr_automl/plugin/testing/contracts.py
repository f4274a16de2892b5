"""Contract suites every plugin passes. A plugin's own tests subclass them and provide fixtures.

Example (in a third-party plugin's tests)::

    class TestMyBackbone(BackboneContract):
        @pytest.fixture
        def backbone(self):
            return my_backbone(tiny=True)
"""

from __future__ import annotations

import io
import json

import torch

from cxr_automl.plugin.interfaces import (
    Backbone,
    BackboneOutput,
    DatasetBundle,
    Head,
    HeadParts,
    HeadSpec,
    SplittableHead,
    predict,
)
from cxr_automl.plugin.strategy import (
    PROTOCOLS,
    CustomStep,
    MultiTask,
    PlannedSchedule,
    Pretraining,
    Strategy,
    declared,
    undeclared_hooks,
)
from cxr_automl.train.runtime import TrainerConfig
from cxr_automl.train.step import TrainStep


class BackboneContract:
    """Needs a fixture ``backbone`` returning a small instance."""

    def _input(self, backbone: Backbone, batch: int = 2) -> torch.Tensor:
        spec = backbone.input_spec
        size = spec.size if spec.fixed_size else min(spec.size, 64)
        return torch.rand(batch, spec.channels, size, size)

    def test_input_spec(self, backbone: Backbone) -> None:
        spec = backbone.input_spec
        assert spec.size > 0 and spec.channels in (1, 3)
        assert len(spec.mean) == len(spec.std) == spec.channels
        assert all(s > 0 for s in spec.std)

    def test_pooled_and_nchw_features(self, backbone: Backbone) -> None:
        backbone.eval()
        x = self._input(backbone)
        with torch.no_grad():
            out = backbone(x)
        assert isinstance(out, BackboneOutput)
        assert out.pooled.shape == (2, backbone.embed_dim)
        assert len(out.features) == len(backbone.feature_channels) >= 1
        sizes = []
        for fmap, ch in zip(out.features, backbone.feature_channels):
            assert fmap.ndim == 4 and fmap.shape[0] == 2 and fmap.shape[1] == ch, "feature maps must be NCHW"
            sizes.append(fmap.shape[-1])
        assert sizes == sorted(sizes, reverse=True), "feature maps go from high to low resolution"

    def test_each_tensor_is_registered_once(self, backbone: Backbone) -> None:
        # a module reachable under two names doubles every checkpoint and makes EMA updates apply twice
        first: dict[int, str] = {}
        for key, tensor in backbone.state_dict().items():
            if tensor.numel():
                ptr = tensor.untyped_storage().data_ptr()
                assert ptr not in first, f"{key} shares its storage with {first.get(ptr)}: registered twice"
                first[ptr] = key

    def test_blocks_cover_every_parameter_in_order(self, backbone: Backbone) -> None:
        blocks = list(backbone.blocks())
        assert len(blocks) >= 2
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        assert in_blocks == {id(p) for p in backbone.parameters()}, "blocks() must cover every parameter"
        # the top block must influence the output: unfreezing "the top 1" is meaningful
        x = self._input(backbone)
        backbone.train()
        backbone(x).pooled.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[-1].parameters())


class HeadContract:
    """Needs fixtures ``head`` (built for ``in_dim=32, in_channels=(8, 16, 32), num_classes=3``)
    and ``batch`` (a dict with the head's targets for 4 images of 64×64, e.g. from ``example_batch``)."""

    def _feats(self) -> BackboneOutput:
        return BackboneOutput(pooled=torch.randn(4, 32), input_size=(64, 64),
                              features=[torch.randn(4, 8, 16, 16), torch.randn(4, 16, 8, 8), torch.randn(4, 32, 4, 4)])

    def test_forward_loss_backward(self, head: Head, batch: dict) -> None:
        out = head(self._feats())
        loss = head.loss(out, batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in head.parameters() if p.requires_grad)

    def test_spec_is_data(self, head: Head) -> None:
        spec = head.spec
        assert isinstance(spec, HeadSpec) and head.task == spec.task
        assert spec.task in ("classification", "detection", "segmentation")
        if not callable(spec.feature_maps):
            assert spec.feature_maps >= 0

    def test_split_parts_compute_the_head(self, head: Head, batch: dict) -> None:
        if not isinstance(head, SplittableHead):
            return
        feats = self._feats()
        parts = head.split()
        assert isinstance(parts, HeadParts)
        shared_ids = {id(p) for p in parts.shared.parameters()}
        assert shared_ids and not shared_ids & {id(p) for p in parts.own.parameters()}, "the parts overlap"
        out = parts.own(parts.shared(parts.maps(feats)))
        loss = parts.own.loss(out, batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None for p in parts.shared.parameters()), "the loss must reach the shared part"
        parts.own.eval()
        with torch.no_grad():
            assert parts.own.predict(parts.own(parts.shared(parts.maps(feats)))) is not None

    def test_predict_is_probability(self, head: Head, batch: dict) -> None:
        head.eval()
        with torch.no_grad():
            pred = predict(head, head(self._feats()), batch)
        if head.task == "detection":  # per image: boxes xyxy in [0, 1], scores in [0, 1], class ids
            assert len(pred) == 4
            for p in pred:
                assert p["boxes"].shape == (len(p["scores"]), 4) and len(p["labels"]) == len(p["scores"])
                assert ((p["scores"] >= 0) & (p["scores"] <= 1)).all()
                assert ((p["boxes"] >= 0) & (p["boxes"] <= 1)).all()
                assert ((p["labels"] >= 0) & (p["labels"] < 3)).all()
        else:
            assert ((pred >= 0) & (pred <= 1)).all()


def example_batch(task: str, num_classes: int = 3, n: int = 4, size: int = 64) -> dict:
    """Targets of ``n`` random ``size``² images for a head of ``task`` (the last image has no boxes)."""
    gen = torch.Generator().manual_seed(0)
    batch: dict = {"image": torch.rand(n, 1, size, size, generator=gen),
                   "image_id": [f"img{i}" for i in range(n)]}
    if task == "classification":
        batch["labels"] = (torch.rand(n, num_classes, generator=gen) > 0.5).float()
        batch["labels"][1, -1] = float("nan")  # an unknown label
    elif task == "segmentation":
        batch["masks"] = (torch.rand(n, num_classes, size, size, generator=gen) > 0.5).to(torch.uint8)
    elif task == "detection":
        batch["boxes"] = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]])] * (n - 1) \
            + [torch.zeros(0, 4)]
        batch["box_labels"] = [torch.tensor([0, num_classes - 1])] * (n - 1) + [torch.zeros(0, dtype=torch.long)]
    return batch


class StrategyContract:
    """Needs fixtures ``strategy`` (fresh), ``model`` (a CXRModel) and ``data`` (a DatasetBundle)."""

    def test_hooks_in_order_and_state_roundtrip(self, strategy: Strategy, model: torch.nn.Module,
                                                data: DatasetBundle) -> None:
        if isinstance(strategy, MultiTask):  # composes its datasets; the head is re-sized in setup
            data = strategy.prepare_data(data)
        strategy.setup(model, data)
        groups = strategy.param_groups(model)
        assert groups and all("params" in g and "lr" in g for g in groups)
        if isinstance(strategy, CustomStep):
            assert isinstance(strategy.optimizer(groups), torch.optim.Optimizer)
        optimizable = {id(p) for g in groups for p in g["params"]}
        assert isinstance(strategy.epochs, int) and strategy.epochs >= 1
        for epoch in range(strategy.epochs):
            plan = strategy.plan(epoch, model)
            assert plan.trainable, "some module must train in every epoch"
            assert {id(p) for m in plan.trainable for p in m.parameters()} <= optimizable, \
                "a trainable parameter is missing from param_groups"
        batch = {"labels": torch.zeros(2, len(data.class_names))}
        images = torch.rand(2, data.channels, 32, 32)
        out = strategy.forward(model, images, batch) if isinstance(strategy, CustomStep) else model(images)
        assert torch.isfinite(strategy.loss(model, out, batch))
        if isinstance(strategy, CustomStep):
            strategy.after_step(model)
        step = TrainStep(TrainerConfig(), torch.device("cpu"))  # the run's step: defaults, on the CPU
        assert isinstance(strategy.eval_model(model, step), torch.nn.Module)
        assert strategy.after_epoch(0, model, {strategy.monitor(): 0.5}) in (True, False)
        assert isinstance(strategy.monitor(), str) and strategy.monitor().startswith("val/")
        state = strategy.state_dict()
        strategy.load_state_dict(state)

    def test_protocol_hooks_are_declared_and_implemented(self, strategy: Strategy) -> None:
        # a protocol hook on a strategy that does not declare the protocol is never called by the loop
        assert not undeclared_hooks(strategy), f"declare the protocols of {undeclared_hooks(strategy)}"
        for proto in declared(strategy):
            hooks = PROTOCOLS[proto]
            own = [h for h in hooks if getattr(type(strategy), h) is not getattr(proto, h)]
            assert own, f"{type(strategy).__name__} declares {proto.__name__} but overrides none of {hooks}"
            missing = [h for h in getattr(proto, "__abstractmethods__", ()) if h not in own]
            assert not missing, f"{type(strategy).__name__} declares {proto.__name__} without {missing}"

    def test_multi_task_hooks(self, strategy: Strategy, model: torch.nn.Module, data: DatasetBundle) -> None:
        if not isinstance(strategy, MultiTask):
            return
        data = strategy.prepare_data(data)
        strategy.setup(model, data)
        strategy.to_device(model, torch.device("cpu"))
        n = len(data.train)
        for epoch in range(strategy.epochs):
            strategy.plan(epoch, model)
            indices = strategy.train_indices(epoch, n)
            assert indices is None or (len(indices) > 0 and all(0 <= int(i) < n for i in indices))
        parts = strategy.evaluations(model, "test")
        assert parts is None or all(len(p.indices) and p.task in ("classification", "detection", "segmentation")
                                    for p in parts)
        assert isinstance(strategy.summarize("test", {}), dict)

    def test_pretraining_exports(self, strategy: Strategy, model: torch.nn.Module, data: DatasetBundle,
                                 tmp_path) -> None:
        if not isinstance(strategy, Pretraining):
            return
        strategy.setup(model, data)
        strategy.export(model, tmp_path)
        assert any(tmp_path.iterdir()), "export wrote nothing into run_dir"

    def test_planned_schedule_is_data_and_renders(self, strategy: Strategy) -> None:
        if not isinstance(strategy, PlannedSchedule):
            return
        rows = [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in strategy.schedule()]
        assert len(rows) == strategy.epochs, "one schedule row per epoch"
        json.dumps(rows)  # ``cxr-automl plan --json`` prints them as they are
        from rich.console import Console
        console = Console(file=io.StringIO(), width=200)
        console.print(strategy.render_schedule(rows))


class DatasetContract:
    """Needs a fixture ``bundle`` (a small ``DatasetBundle``). Checks the item format every head relies on."""

    def test_items_follow_the_interface(self, bundle: DatasetBundle) -> None:
        import math
        import pickle
        c = len(bundle.class_names)
        for split in ("train", "val", "test"):
            ds = getattr(bundle, split)
            assert len(ds) > 0, split
            labels = bundle.label_matrix(split)
            assert labels.shape == (len(ds), c) and labels.dtype == torch.float32
            assert all(math.isnan(v) or v in (0.0, 1.0) for v in labels.flatten().tolist())
            for i in sorted({0, len(ds) - 1}):
                item = ds[i]
                img = item["image"]
                assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == bundle.channels
                assert 0 <= float(img.min()) and float(img.max()) <= 1
                assert isinstance(item["image_id"], str)
                assert torch.equal(item["labels"].nan_to_num(-1), labels[i].nan_to_num(-1))
                if "boxes" in item:
                    boxes, cls = item["boxes"], item["box_labels"]
                    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
                    assert cls.dtype == torch.int64 and cls.shape == (len(boxes),)
                    assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())
                    assert bool((boxes >= 0).all() and (boxes[:, [0, 2]] <= img.shape[2]).all()
                                and (boxes[:, [1, 3]] <= img.shape[1]).all())
                if "masks" in item:
                    masks = item["masks"]
                    assert masks.dtype in (torch.uint8, torch.bool) and masks.ndim == 3
                    assert masks.shape[1:] == img.shape[1:] and int(masks.max()) <= 1
        assert bundle.task in ("classification", "detection", "segmentation")
        first = bundle.train[0]
        if bundle.task == "detection":  # box classes index class_names
            assert "boxes" in first and all(bool((ds[i]["box_labels"] < c).all())
                                            for ds in (bundle.train, bundle.test) for i in range(min(len(ds), 8)))
        if bundle.task == "segmentation":  # one mask per class
            assert "masks" in first and first["masks"].shape[0] == c
        clone = pickle.loads(pickle.dumps(bundle.train))  # DataLoader workers receive a pickled split
        assert torch.equal(clone[0]["image"], bundle.train[0]["image"])


__all__ = ["BackboneContract", "DatasetContract", "HeadContract", "StrategyContract", "example_batch"]
