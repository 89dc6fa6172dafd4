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


def test_every_spec_field_round_trips_through_toml(tmp_path):
    original = config.from_dict({"train": {
        "strategy": "periodic(every=4, merge=trimmed_mean(beta=0.25))", "partition": "dirichlet(0.3)",
        "schedule": "cosine(warmup=10)", "penalty": "elastic(l1=2e-5, l2=0.001)", "constraint": "max_norm(2.5)",
        "momentum": 0.9, "nesterov": True}})
    path = tmp_path / "run.toml"
    path.write_text(original.to_toml())
    assert 'strategy = "periodic(every=4, merge=trimmed_mean(beta=0.25))"' in path.read_text()
    assert 'penalty = "elastic(l1=2e-05, l2=0.001)"' in path.read_text()
    assert config.load(path) == original


@pytest.mark.parametrize("spec", ["sync", "single", "oneshot", "periodic", "periodic(every=3)",
                                  "periodic(every=epoch, warmup=10, optimizer_state=reset)", "hogwild",
                                  "diloco(every=50, outer_lr=0.5, nesterov=false)", "sync(merge=median)",
                                  "oneshot(merge=multi_krum(f=1, m=2))", "periodic(8, merge=greedy_soup)"])
def test_strategy_specs_round_trip(spec):
    assert parse(parse(spec).spec()) == parse(spec)


def test_unknown_table_is_refused():
    with pytest.raises(ConfigError, match="'data', 'model', 'train'"):
        config.from_dict({"trian": {}})


def test_model_table_is_checked():
    with pytest.raises(ConfigError, match="model.activation='swish'"):
        config.from_dict({"model": {"activation": "swish"}})


def test_a_class_path_model_round_trips_through_toml(tmp_path):
    (tmp_path / "net.py").write_text("from torch import nn\n\nclass Net(nn.Linear):\n    pass\n")
    run = tmp_path / "run.toml"
    run.write_text('[model]\nclass_path = "net.py:Net"\n[model.init_args]\nin_features = 4\nout_features = 2\n')
    loaded = config.load(run)
    assert loaded.model.class_path == f"{tmp_path / 'net.py'}:Net"  # resolved against the run file's folder
    assert loaded.model.init_args == {"in_features": 4, "out_features": 2}
    assert "hidden" not in loaded.to_dict()["model"]
    again = tmp_path / "elsewhere" / "config.toml"
    again.parent.mkdir()
    again.write_text(loaded.to_toml())
    assert config.load(again) == loaded
    assert loaded.model.factory()().weight.shape == (2, 4)
    wider = config.load(run, ["model.init_args.out_features=3"])
    assert wider.model.init_args == {"in_features": 4, "out_features": 3}
    assert loaded.model.init_args["out_features"] == 2  # the first load's table is not changed
