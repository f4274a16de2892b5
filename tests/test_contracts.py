"""Every registered component passes its kind's contract suite (parametrized over the registry)."""

import pytest
import torch

from cxr_automl import config
from cxr_automl.plugin import registry
from cxr_automl.plugin.testing.contracts import BackboneContract, HeadContract, StrategyContract, example_batch
from cxr_automl.train.model import build_model


def _built_in(kind):
    return [n for n, i in registry.available(kind).items() if i.distribution == "cxr-automl"]


#: full-size backbones run offline at random init and, where the architecture allows, a smaller input
FULL_SIZE = {"rad_dino": ["backbone.weights=null", "backbone.image_size=224"], "swin_b": [],
             "hiera": ["backbone.weights=null", "backbone.image_size=224"]}


def _backbone_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in FULL_SIZE else n for n in _built_in("backbone")]


@pytest.fixture(scope="module")
def data():
    return registry.build("dataset", "synthetic_cxr", n_train=32, n_val=16, n_test=16, image_size=32)


class TestBackbones(BackboneContract):
    @pytest.fixture(params=_backbone_params())
    def backbone(self, request):
        cfg = config.compose([f"backbone={request.param}", *FULL_SIZE.get(request.param, [])])["backbone"]
        cfg.pop("name")
        torch.manual_seed(0)
        return registry.build("backbone", request.param, **cfg)


class TestHeads(HeadContract):
    @pytest.fixture(params=_built_in("head"))
    def head(self, request):
        return registry.build("head", request.param, supplied={"in_dim": 32, "in_channels": (8, 16, 32),
                                                                "num_classes": 3})

    @pytest.fixture
    def batch(self, head):
        return example_batch(head.task)


@pytest.mark.parametrize("name", _built_in("head"))
def test_head_factories_declare_the_spec_of_what_they_build(name):
    head = registry.build("head", name, supplied={"in_dim": 32, "in_channels": (8, 16, 32), "num_classes": 3})
    assert registry.load("head", name).head_spec is head.spec  # compat reads the factory's, the loop the head's


def test_the_multi_dataset_heads_split():
    from cxr_automl.plugin.interfaces import SplittableHead
    assert {n for n in _built_in("head") if isinstance(registry.build(
        "head", n, supplied={"in_dim": 32, "in_channels": (8, 16, 32), "num_classes": 3}), SplittableHead)} \
        >= {"dino", "upernet", "unet"}


class TestStrategies(StrategyContract):
    @pytest.fixture(params=_built_in("strategy"))
    def strategy(self, request):
        # lock_release's epochs follow its schedule; its shipped Table 8 datasets need dense heads
        extra = {"lock_release": ["strategy.datasets=[{name: a, tasks: [cls]}, {name: b, tasks: [cls]}]",
                                  "strategy.lock_classification=true"],
                 "mlvicx": ["strategy.epochs=3", "strategy.expander_dim=32", "strategy.downstream_epochs=1"]}
        cfg = config.compose([f"strategy={request.param}",
                              *extra.get(request.param, ["strategy.epochs=3"])])["strategy"]
        return registry.build("strategy", cfg.pop("name"), **cfg)

    @pytest.fixture
    def model(self, data):
        return build_model({"name": "resnet_tiny", "width": 8}, {"name": "mlp", "hidden": 16}, data)


def test_dataset_items_follow_the_interface(data):
    item = data.train[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape[0] == data.channels
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert item["labels"].shape == (len(data.class_names),)
    assert isinstance(item["image_id"], str)
    assert data.label_matrix("val").shape == (len(data.val), len(data.class_names))


def test_model_features_are_the_one_path_to_the_backbone(data):
    # rad_dino_tiny needs a fixed input size: features() adapts 32 px grayscale to its spec and says so
    for backbone in ({"name": "resnet_tiny", "width": 8}, {"name": "rad_dino_tiny"}):
        model = build_model(backbone, {"name": "mlp", "hidden": 16}, data).eval()
        x = torch.rand(2, 1, 32, 32)
        spec = model.backbone.input_spec
        with torch.no_grad():
            feats = model.features(x)
            assert feats.input_size == ((spec.size,) * 2 if spec.fixed_size else (32, 32))
            torch.testing.assert_close(model(x), model.head(feats))


def test_a_protocol_hook_without_its_protocol_is_reported():
    from cxr_automl.plugin.strategy import CORE_HOOKS, PROTOCOLS, Pretraining, Strategy, undeclared_hooks

    class Forgetful(Strategy):
        def param_groups(self, model):
            return []

        def plan(self, epoch, model):
            raise NotImplementedError

        def export(self, model, run_dir):  # never called: Pretraining is not declared
            pass

    class Declared(Forgetful, Pretraining):
        pass

    assert undeclared_hooks(Forgetful()) == ["export (declare Pretraining)"]
    assert undeclared_hooks(Declared()) == []
    # the core stays small: eight concepts (state_dict/load_state_dict are one), the rest opt-in
    assert len(CORE_HOOKS) - 1 <= 8 and not set(CORE_HOOKS) & {h for hs in PROTOCOLS.values() for h in hs}
    assert Strategy.__abstractmethods__ == {"param_groups", "plan"}
