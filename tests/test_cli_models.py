"""Your own model in a run file ([model] class_path + init_args), --print-config, --version, and
a command line that answers --help without importing torch."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from safetensors.torch import load_file

import unison.cli
from unison import config
from unison.cli import main
from unison.errors import ConfigError
from unison.history import read_jsonl

CNN = '''
import torch
from torch import nn

WIDTH = 3


class NotAModel:
    pass


class SmallCNN(nn.Module):
    """8x8 digits: one convolution, a 2x2 pool, a linear head."""

    def __init__(self, channels=4, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels * 16, classes)

    def forward(self, x):
        x = torch.relu(self.conv(x.view(-1, 1, 8, 8)))
        return self.head(nn.functional.max_pool2d(x, 2).flatten(1))


class Strict(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"Strict takes no {sorted(kwargs)}")
        self.layer = nn.Linear(64, 10)
'''

RUN = """
[model]
class_path = "{class_path}"
[model.init_args]
channels = 6
[train]
strategy = "periodic(every=epoch)"
backend = "{backend}"
workers = 2
epochs = 3
lr = 0.1
"""


@pytest.fixture
def cnn_run(tmp_path):
    """A run file naming SmallCNN in models/cnn.py beside it, by a relative path."""
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "cnn.py").write_text(CNN)

    def write(backend="threads", class_path="models/cnn.py:SmallCNN", extra=""):
        path = tmp_path / "run.toml"
        path.write_text(RUN.format(class_path=class_path, backend=backend) + extra)
        return path

    return write


def _check_cnn_run(out: Path, tmp_path: Path):
    state = load_file(out / "model.safetensors")
    # the CNN's parameters, and init_args' channels=6 reached the constructor
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "conv.weight": (6, 1, 3, 3), "conv.bias": (6,), "head.weight": (10, 96), "head.bias": (10,)}
    history = read_jsonl(out / "history.jsonl")
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.5  # ten classes: it learned, not guessed
    recorded = config.load(out / "config.toml")  # what --resume reads back
    assert recorded.model.class_path == f"{tmp_path / 'models' / 'cnn.py'}:SmallCNN"
    assert recorded.model.init_args == {"channels": 6}


def test_a_cnn_from_a_file_beside_the_run_file_trains_on_threads(cnn_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir("/")  # relative to the run file's folder, not the current one
    out = tmp_path / "out"
    assert main(["train", str(cnn_run()), "--out", str(out), "--quiet"]) == 0
    _check_cnn_run(out, tmp_path)
    # the recorded run file runs again (as --resume would) and names the same model
    assert main(["train", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert load_file(tmp_path / "again" / "model.safetensors")["conv.weight"].shape == (6, 1, 3, 3)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_cnn_from_a_file_trains_on_processes(cnn_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(cnn_run("processes")), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    _check_cnn_run(out, tmp_path)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_a_cnn_from_a_file_trains_under_torchrun_as_on_threads(cnn_run, tmp_path, capsys):
    import torch
    from torchrun_runs import torchrun_train

    cnn_run()  # writes models/cnn.py
    done, out = torchrun_train(RUN.format(class_path="models/cnn.py:SmallCNN", backend="threads"), tmp_path)
    assert "backend=torchrun" in done.stdout and done.stdout.count("run directory:") == 1  # rank 0 only
    _check_cnn_run(out, tmp_path)
    assert main(["train", str(cnn_run()), "--out", str(tmp_path / "threads"), "--quiet"]) == 0
    on_threads, on_torchrun = load_file(tmp_path / "threads" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(on_threads[k], on_torchrun[k], atol=1e-5, rtol=0) for k in on_threads)


def test_a_module_class_path_and_a_factory_function(tmp_path, monkeypatch):
    (tmp_path / "my_models_pkg").mkdir()
    (tmp_path / "my_models_pkg" / "__init__.py").write_text(CNN + "\n\ndef make(width):\n    return nn.Linear(64, width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.from_dict({"model": {"class_path": "my_models_pkg:SmallCNN", "init_args": {"channels": 2}}})
    assert cfg.model.class_path == "my_models_pkg:SmallCNN"  # a module path is kept as it is
    assert cfg.model.factory()().conv.out_channels == 2
    made = config.from_dict({"model": {"class_path": "my_models_pkg:make", "init_args": {"width": 10}}})
    assert made.model.factory()().out_features == 10


@pytest.mark.parametrize("class_path, init_args, words", [
    ("models/cnn.py", None, ["model.class_path='models/cnn.py'", "'package.module:Name'"]),
    ("no_such_module_xyz:Net", None, ["no module named 'no_such_module_xyz'", "'path/to/file.py:Name'"]),
    ("models/gone.py:Net", None, ["gone.py", "does not exist"]),
    ("models/cnn.py:Nope", None, ["has no attribute 'Nope'", "SmallCNN", "Strict"]),
    ("models/cnn.py:NotAModel", None, ["NotAModel", "not an nn.Module subclass"]),
    ("models/cnn.py:WIDTH", None, ["WIDTH", "not callable"]),
    ("models/cnn.py:SmallCNN", "widht = 3", ["model.init_args={'widht': 3}", "unexpected keyword argument 'widht'",
                                             "channels=4, classes=10"]),
    ("models/cnn.py:Strict", "width = 3", ["model.init_args={'width': 3}", "raised TypeError",
                                           "Strict takes no ['width']"]),
])
def test_a_bad_class_path_is_one_line_and_exit_2(cnn_run, tmp_path, capsys, class_path, init_args, words):
    run_file = cnn_run(class_path=class_path)
    text = run_file.read_text().replace("channels = 6", init_args or "")
    run_file.write_text(text)
    assert main(["train", str(run_file), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unison: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "x").exists()


def test_class_path_and_mlp_settings_do_not_mix(tmp_path):
    (tmp_path / "cnn.py").write_text(CNN)
    with pytest.raises(ConfigError, match=r"cannot be combined with the built-in MLP's settings \(hidden\)"):
        config.from_dict({"model": {"class_path": "cnn.py:SmallCNN", "hidden": [64]}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"cannot be combined .*\(activation\)"):
        config.from_dict({"model": {"class_path": "cnn.py:SmallCNN"}}, {"model.activation": "tanh"}, base=tmp_path)
    with pytest.raises(ConfigError, match="model.init_args needs model.class_path"):
        config.from_dict({"model": {"init_args": {"channels": 2}}})


def test_print_config_prints_the_resolved_run_file_and_trains_nothing(cnn_run, tmp_path, capsys):
    run_file = cnn_run()
    assert main(["train", str(run_file), "--print-config", "--set", "train.epochs=7", "--out", str(tmp_path / "x")]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert config.from_dict(printed) == config.load(run_file, ["train.epochs=7"])
    assert printed["train"]["epochs"] == 7 and printed["train"]["batch_size"] == 64  # a default, filled in
    assert printed["data"] == {"dataset": "digits", "val_fraction": 0.2}
    assert printed["model"] == {"class_path": f"{tmp_path / 'models' / 'cnn.py'}:SmallCNN", "init_args": {"channels": 6}}
    assert not (tmp_path / "x").exists()


def test_print_config_of_the_mlp_fills_in_its_defaults(tmp_path, capsys):
    run_file = tmp_path / "run.toml"
    run_file.write_text('[model]\nhidden = [8]\n')
    assert main(["train", str(run_file), "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["model"] == {"hidden": [8], "activation": "relu", "dropout": 0.0, "batchnorm": False}
    assert config.from_dict(printed) == config.load(run_file)


def test_compare_with_a_class_path_run_file(cnn_run, tmp_path, capsys):
    run_file = cnn_run()
    out = tmp_path / "cmp"
    assert main(["compare", str(run_file), "--strategies", "single,sync", "--epochs", "1", "--repeat", "1",
                 "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    models = sorted(out.glob("*/model.safetensors"))
    assert len(models) == 2
    for path in models:
        assert load_file(path)["conv.weight"].shape == (6, 1, 3, 3)


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"unison {importlib.metadata.version('unison')}\n"
    done = subprocess.run([sys.executable, "-m", "unison", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"unison {unison.cli.version()}"


def test_the_cli_module_parses_help_without_importing_torch():
    """cli.py itself imports no torch to parse --help. The package's __init__ still imports
    everything, so this loads cli.py under a bare stand-in for the package."""
    src = Path(unison.cli.__file__).parent
    code = ("import sys, types\n"
            f"pkg = types.ModuleType('unison'); pkg.__path__ = [{str(src)!r}]; sys.modules['unison'] = pkg\n"
            "import unison.cli\n"
            "for argv in (['--help'], ['train', '--help'], ['--version']):\n"
            "    try:\n"
            "        unison.cli.main(argv)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: unison train" in done.stdout and done.stdout.strip().endswith("TORCH False")


def test_a_failed_cnn_run_resumes_from_its_recorded_run_file(cnn_run, tmp_path, capsys, monkeypatch):
    import unison.engine.replica

    run_file = cnn_run(extra="checkpoint_every = 1\n")
    out = tmp_path / "out"
    real = unison.engine.replica.Replica.forward_backward

    def forward_backward(self, x, y):  # digits: 12 steps an epoch per worker; fail in epoch 3
        if self.step + 1 == 30:
            raise RuntimeError("power cut")
        return real(self, x, y)

    with monkeypatch.context() as patch:
        patch.setattr(unison.engine.replica.Replica, "forward_backward", forward_backward)
        assert main(["train", str(run_file), "--out", str(out), "--quiet"]) == 2
    assert "power cut" in capsys.readouterr().err
    run_file.unlink()  # --resume needs only the run folder's config.toml (and the model file)
    monkeypatch.chdir("/")
    assert main(["train", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    _check_cnn_run(out, tmp_path)
