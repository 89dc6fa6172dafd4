"""Run settings as frozen, keyword-only dataclasses, validated on creation; TOML in and out.

A run file has three tables, one per dataclass::

    [data]   dataset = "digits"   val_fraction = 0.2
    [model]  hidden = [64]        activation = "relu"      (the built-in MLP), or your own model:
    [model]  class_path = "cnn.py:Net"   [model.init_args] channels = 8
    [train]  strategy = "periodic(every=epoch)"   workers = 4   epochs = 60   lr = 0.05
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import tomli_w

from . import classpath, partitions, penalties, schedules, strategies
from .engine.job import OPTIMIZERS
from .errors import ConfigError, expected
from .launch import NAMES as BACKENDS
from .models import ACTIVATIONS, mlp
from .validators import check_bool, check_choice, check_float, check_int

DEVICE = re.compile(r"cpu|cuda(:\d+)?")
LOSSES = ("cross_entropy", "mse")
NAN_POLICIES = ("stop", "skip", "rollback")
BALANCES = ("none", "speed")
ON_FAILURE = ("stop", "continue")
_DURATION_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data set to train on (a built-in name, ``synthetic(samples=..)`` or a .csv/.npz/.pt
    file), which CSV column holds the labels (default the last), and how much to hold out."""

    dataset: str = "digits"
    val_fraction: float = 0.2
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(expected("data.dataset", self.dataset, "a built-in name or a file path"))
        check_float("data.val_fraction", self.val_fraction, low=0.0, high=1.0)
        if self.label is not None and (not isinstance(self.label, str) or not self.label):
            raise ConfigError(expected("data.label", self.label, "the name of a CSV column"))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model: the built-in MLP (see unison.models.mlp; inputs and outputs are taken from the
    data), or your own, named Lightning-CLI style by ``class_path`` ("package.module:Name" or
    "path/to/file.py:Name", an nn.Module subclass or a function returning one) and built as
    ``Name(**init_args)``. A relative file is resolved against the run file's folder when the
    run file is read (see from_dict's ``base``); the class is imported and its arguments
    checked here, so a bad one fails before any worker starts."""

    hidden: tuple[int, ...] = (64,)
    activation: str = "relu"
    dropout: float = 0.0
    batchnorm: bool = False
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.class_path is not None or self.init_args:
            self._check_class_path()
            return
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))
        if not isinstance(self.hidden, tuple):
            raise ConfigError(expected("model.hidden", self.hidden, "a list of layer widths"))
        for width in self.hidden:
            check_int("model.hidden", width, minimum=1)
        check_choice("model.activation", self.activation, ACTIVATIONS)
        check_float("model.dropout", self.dropout, low=0.0, high=1.0)
        check_bool("model.batchnorm", self.batchnorm)

    def _check_class_path(self) -> None:
        if self.class_path is None:
            raise ConfigError("model.init_args needs model.class_path (the model they are for); the "
                              f"built-in MLP takes {', '.join(MLP_SETTINGS)} directly under [model]")
        given = [f.name for f in fields(self) if f.name in MLP_SETTINGS and getattr(self, f.name) != f.default]
        if given:
            raise ConfigError(_mixed(given))
        if not isinstance(self.init_args, Mapping):
            raise ConfigError(expected("model.init_args", self.init_args, "a table of keyword arguments"))
        object.__setattr__(self, "init_args", dict(self.init_args))
        object.__setattr__(self, "class_path", classpath.absolute("model.class_path", self.class_path, None))
        target = classpath.load("model.class_path", self.class_path)
        classpath.check_args("model.init_args", self.class_path, target, self.init_args)

    def factory(self, inputs: int | None = None, outputs: int | None = None) -> Callable[[], Any]:
        """A zero-argument factory of this model; ``inputs``/``outputs`` (from the data) size the
        MLP and are not needed for a class_path model."""
        if self.class_path is None:
            if inputs is None or outputs is None:
                raise ConfigError("the built-in MLP needs its inputs and outputs (from the data)")
            return lambda: mlp(inputs, list(self.hidden), outputs, activation=self.activation,
                               dropout=self.dropout, batchnorm=self.batchnorm)
        target = classpath.load("model.class_path", self.class_path)
        return lambda: classpath.build("model.init_args", self.class_path, target, self.init_args)

    def table(self) -> dict[str, Any]:
        """The [model] table: the MLP's settings, or class_path and init_args."""
        if self.class_path is None:
            return {name: _plain(getattr(self, name)) for name in MLP_SETTINGS}
        table: dict[str, Any] = {"class_path": self.class_path}
        if self.init_args:
            table["init_args"] = dict(self.init_args)
        return table


MLP_SETTINGS = ("hidden", "activation", "dropout", "batchnorm")


def _mixed(keys: list[str]) -> str:
    return (f"model.class_path cannot be combined with the built-in MLP's settings ({', '.join(keys)}); "
            "give your model's arguments under [model.init_args]")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: the arguments of unison.fit() that are plain values.

    ``strategy``, ``partition``, ``schedule``, ``penalty`` and ``constraint`` are given as spec
    strings such as ``"periodic(every=16)"`` or ``"l2(1e-4)"``, or as objects; either way they
    are stored as objects and written to TOML as their spec.
    """

    strategy: Any = "periodic"
    workers: int = 2
    backend: str = "processes"
    partition: Any = "shard"
    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Any = None
    penalty: Any = None
    constraint: Any = None
    loss: str | None = None
    seed: int = 0
    timeout: float = 300.0
    replicas_per_worker: int = 1   # > 1: each process holds that many stacked replicas
    device: str = "cpu"            # where backend="stacked" trains: "cpu", "cuda" or "cuda:N"
    # Reliability: checkpoints (see unison.checkpoint) and what a non-finite loss does.
    checkpoint_every: int | str | None = None   # rounds (an int) or a duration: "90s", "10min", "1h"
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    nan: str = "stop"
    # Uneven workers, declared: worker r takes max(speeds)/speeds[r] times its step time (unison.engine.pace).
    speeds: tuple[float, ...] | None = None
    balance: str = "none"          # "speed": shares and batches ∝ each worker's throughput (unison.balance)
    on_failure: str = "stop"       # "continue": a worker whose step raises (or process dies) is dropped, the run goes on

    def __post_init__(self) -> None:
        check_int("workers", self.workers, minimum=1)
        check_choice("backend", self.backend, BACKENDS)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        if self.optimizer != "custom":
            check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("momentum", self.momentum, low=0.0, high=1.0)
        if self.momentum and self.optimizer in ("adam", "adamw"):
            raise ConfigError(f"momentum={self.momentum} applies to optimizer='sgd' only; "
                              f"{self.optimizer!r} keeps its own moment estimates")
        check_bool("nesterov", self.nesterov)
        if self.nesterov and (self.optimizer != "sgd" or not self.momentum):
            raise ConfigError(f"nesterov=True needs optimizer='sgd' with momentum > 0; got "
                              f"optimizer={self.optimizer!r}, momentum={self.momentum}")
        check_float("weight_decay", self.weight_decay, low=0.0)
        if self.loss is not None and self.loss != "custom":
            check_choice("loss", self.loss, LOSSES)
        check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)  # what every generator it seeds accepts
        check_float("timeout", self.timeout, low=0.0, low_open=True)
        self._check_reliability()
        self._check_speeds()
        # parse() raises ConfigError naming the accepted names and options.
        object.__setattr__(self, "strategy", strategies.parse(self.strategy))
        object.__setattr__(self, "partition", partitions.parse(self.partition))
        object.__setattr__(self, "schedule", schedules.parse(self.schedule))
        object.__setattr__(self, "penalty", penalties.parse_penalty(self.penalty))
        object.__setattr__(self, "constraint", penalties.parse_constraint(self.constraint))
        check_int("replicas_per_worker", self.replicas_per_worker, minimum=1)
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ConfigError(expected("device", self.device, "'cpu', 'cuda' or 'cuda:N'"))
        # (rules across fields and backends are the plan's: unison.plan.resolve)

    @property
    def checkpoint_schedule(self) -> tuple[str, float]:
        """checkpoint_every, parsed once: ("rounds", n) or ("seconds", s)."""
        return self._checkpoint_schedule

    def record(self) -> dict[str, Any]:
        """Every setting as a plain value (specs as strings, None kept): what checkpoints save."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def _check_speeds(self) -> None:
        """speeds: one positive finite number per worker (their count is the plan's to check)."""
        check_choice("balance", self.balance, BALANCES)
        check_choice("on_failure", self.on_failure, ON_FAILURE)
        if self.speeds is None:
            return
        accepted = "a list of positive numbers, one per worker, e.g. [1, 1, 0.5, 0.25]"
        if not isinstance(self.speeds, (list, tuple)) or not self.speeds:
            raise ConfigError(expected("speeds", self.speeds, accepted))
        for speed in self.speeds:
            if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed < math.inf:
                raise ConfigError(expected("speeds", list(self.speeds), accepted))
        object.__setattr__(self, "speeds", tuple(float(s) for s in self.speeds))

    def _check_reliability(self) -> None:
        check_choice("nan", self.nan, NAN_POLICIES)
        check_int("keep_checkpoints", self.keep_checkpoints, minimum=1)
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ConfigError(expected("checkpoint_dir", self.checkpoint_dir, "a directory path"))
        if self.checkpoint_every is None and self.checkpoint_dir is not None:  # a directory alone: every round
            object.__setattr__(self, "checkpoint_every", 1)
        # not a field: parsed once here, read by the plan (unison.plan)
        object.__setattr__(self, "_checkpoint_schedule",
                           None if self.checkpoint_every is None else checkpoint_schedule(self.checkpoint_every))


def checkpoint_schedule(every: int | str) -> tuple[str, float]:
    """("rounds", n) for an integer, ("seconds", s) for a duration such as "90s" or "10min"."""
    if isinstance(every, int) and not isinstance(every, bool) and every >= 1:
        return "rounds", float(every)
    if isinstance(every, str):
        match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([a-z]*)", every.strip().lower())
        if match and match.group(2) in ("round", "rounds") and match.group(1).isdigit():
            return checkpoint_schedule(int(match.group(1)))
        if match and match.group(2) in _DURATION_UNITS and float(match.group(1)) > 0:
            return "seconds", float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ConfigError(expected("checkpoint_every", every, "an integer >= 1 (rounds) or a duration "
                               "such as '90s', '10min', '1h' (the first round end after it)"))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run file: data, model and training settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for section in fields(self):
            table = getattr(self, section.name)
            if isinstance(table, ModelConfig):
                out[section.name] = table.table()
                continue
            values = {f.name: getattr(table, f.name) for f in fields(table)}
            # TOML has no null: an unset optional value is simply left out.
            out[section.name] = {k: _plain(v) for k, v in values.items() if v is not None}
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "spec"):  # a Strategy or Partition object
        return value.spec()
    return value


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _parse_value(text: str) -> Any:
    """A --set value: a TOML literal (3, 0.1, true, [64, 64]) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
              base: str | Path | None = None) -> RunConfig:
    """Build a RunConfig from nested tables plus ``{"train.lr": 0.1}``-style overrides; a
    relative model.class_path file is resolved against ``base`` (the run file's folder)."""
    tables: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            raise ConfigError(expected("table", name, tuple(SECTIONS)))
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{name}] must be a table of settings, got {table!r}")
        tables[name] = dict(table)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(expected("--set key", key, "data.<name>, model.<name> or train.<name>"))
        if section == "model" and name.startswith("init_args.") and name != "init_args.":
            args = tables.setdefault("model", {}).setdefault("init_args", {})
            if not isinstance(args, Mapping):
                raise ConfigError(expected("model.init_args", args, "a table of keyword arguments"))
            tables["model"]["init_args"] = {**args, name.removeprefix("init_args."): value}
            continue
        tables.setdefault(section, {})[name] = value
    built = {}
    for name, cls in SECTIONS.items():
        table = tables.get(name, {})
        known = tuple(f.name for f in fields(cls))
        for key in table:
            if key not in known:
                raise ConfigError(f"unknown setting {name}.{key}; accepted: {', '.join(known)}")
        if name == "model" and "class_path" in table:
            mixed = [key for key in MLP_SETTINGS if key in table]
            if mixed:
                raise ConfigError(_mixed(mixed))
            table["class_path"] = classpath.absolute("model.class_path", table["class_path"], base)
        try:
            built[name] = cls(**table)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigError(f"[{name}]: {exc}") from None
    return RunConfig(**built)


def load(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run file and apply ``--set key=value`` strings on top."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run file {str(path)!r} is not valid TOML: {exc}") from None
    return from_dict(raw, parse_sets(sets), base=path.parent)


def resolve_paths(raw: Mapping[str, Any], base: str | Path) -> dict[str, Any]:
    """``raw`` with a relative model.class_path file made absolute against ``base``, for
    readers that build the RunConfig themselves (compare's run files)."""
    model = raw.get("model")
    if not isinstance(model, Mapping) or "class_path" not in model:
        return dict(raw)
    return {**raw, "model": {**model, "class_path": classpath.absolute("model.class_path", model["class_path"], base)}}


def parse_sets(sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=0.1"]`` → ``{"train.lr": 0.1}``: values are TOML literals or bare strings."""
    overrides = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(expected("--set", item, "key=value, e.g. train.lr=0.1"))
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides
