import pytest

from unison import config
from unison.errors import ConfigError
from unison.strategies import Periodic, parse


def test_toml_round_trip(tmp_path):
    original = config.from_dict({"train": {"strategy": "periodic(every=16, warmup=4)", "lr": 0.2},
                                 "model": {"hidden": [32, 16], "batchnorm": True}})
    path = tmp_path / "run.toml"
    path.write_text(original.to_toml())
    loaded = config.load(path)
    assert loaded == original
    assert loaded.train.strategy == Periodic(every=16, warmup=4)


def test_set_values_are_toml_literals_or_strings(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nepochs = 2\n")
    loaded = config.load(path, ["train.lr=0.5", "model.hidden=[8, 8]", "train.strategy=sync",
                                "model.batchnorm=true"])
    assert loaded.train.lr == 0.5 and loaded.model.hidden == (8, 8) and loaded.model.batchnorm is True
    assert loaded.train.strategy.spec() == "sync" and loaded.train.epochs == 2


@pytest.mark.parametrize("spec", ["sync", "single", "oneshot", "periodic", "periodic(every=3)",
                                  "periodic(every=epoch, warmup=10, optimizer_state=reset)"])
def test_strategy_specs_round_trip(spec):
    assert parse(parse(spec).spec()) == parse(spec)


def test_unknown_table_is_refused():
    with pytest.raises(ConfigError, match="'data', 'model', 'train'"):
        config.from_dict({"trian": {}})


def test_model_table_is_checked():
    with pytest.raises(ConfigError, match="model.activation='swish'"):
        config.from_dict({"model": {"activation": "swish"}})
