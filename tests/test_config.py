import pytest

from cxr_automl import config
from cxr_automl.plugin.registry import RegistryError


def test_defaults_compose_to_plain_dict():
    cfg = config.compose([])
    assert cfg["backbone"]["name"] == "resnet_tiny"
    assert cfg["strategy"]["name"] == "spft"
    assert cfg["dataset"]["name"] == "synthetic_cxr"
    assert cfg["trainer"]["precision"] == "32"


def test_factory_option_not_in_yaml_is_accepted_without_plus():
    # 'pretrained' is an argument of resnet18 but absent from resnet_tiny's YAML: reject for tiny,
    # accept where the factory takes it
    cfg = config.compose(["backbone=resnet18", "backbone.pretrained=false", "strategy.unfreeze_k=2"])
    assert cfg["strategy"]["unfreeze_k"] == 2
    with pytest.raises(config.ConfigError, match="resnet_tiny.*no option 'pretrained'.*its options: weights"):
        config.compose(["backbone.pretrained=true"])


@pytest.mark.parametrize("overrides, message", [
    (["strategy.bogus=1"], r"strategy 'spft' has no option 'bogus'; its options: epochs"),
    (["trainer.bogus=1"], r"unknown config key 'trainer.bogus'"),
    (["nokey=3"], r"unknown config key 'nokey'"),
    (["strategy.epochs=(("], r"cannot parse override"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=message) as info:
        config.compose(overrides)
    assert "\n" not in str(info.value)


def test_unknown_plugin_lists_known_names():
    with pytest.raises(RegistryError, match=r"unknown head 'nope'; known heads: .*linear, mlp"):
        config.compose(["head=nope"])


def test_values_are_checked_against_the_factory_types_before_anything_builds():
    # the expected types come from spft's signature and TrainerConfig's fields, not from a list
    with pytest.raises(config.ConfigError) as info:
        config.compose(["strategy.epochs=abc", "strategy.lr_head=fast"])
    assert str(info.value) == ("wrong type: strategy.epochs='abc' (needs an integer), "
                               "strategy.lr_head='fast' (needs a number)")
    with pytest.raises(config.ConfigError, match=r"trainer.batch_size=2.5 \(needs an integer\)"):
        config.compose(["trainer.batch_size=2.5"])
    with pytest.raises(config.ConfigError, match=r"trainer.channels_last='yes' \(needs true/false\)"):
        config.compose(["trainer.channels_last=yes"])
    # an int where a float is declared, a number for a string option, null where the default is None
    cfg = config.compose(["strategy.lr_head=1", "trainer.precision=16", "trainer.grad_clip=null"])
    assert cfg["strategy"]["lr_head"] == 1 and cfg["trainer"]["precision"] == 16


def test_the_type_of_an_unannotated_option_is_its_default():
    from cxr_automl.config import types

    def factory(epochs=3, name: str = "x", rate: "float | None" = None, obj=None):  # noqa: ANN001
        return None
    import inspect
    kinds = types.factory_kinds(factory, dict(inspect.signature(factory).parameters))
    assert kinds["epochs"] == {int} and "obj" not in kinds and kinds["rate"] == {float, type(None)}
    assert types.mismatches("s", {"epochs": "many", "rate": None, "obj": "anything"}, kinds) == \
        ["s.epochs='many' (needs an integer)"]
