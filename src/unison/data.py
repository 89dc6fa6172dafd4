"""Training data: built-in sets, user arrays and Datasets, checked and turned into tensors.

Everything ends up as one contiguous float32 feature tensor and one target tensor (int64 class
labels or float32 values) that every worker indexes directly: no DataLoader, no per-sample
Python on the training path, and on the processes backend the tensors sit in shared memory once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import datafiles
from .errors import DataError, expected

CLASSIFICATION, REGRESSION = "classification", "regression"


@dataclass(frozen=True)
class TrainData:
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    task: str                    # "classification" or "regression"
    num_classes: int | None      # classification only
    name: str = "data"
    feature_mean: torch.Tensor | None = None   # standardisation fitted on the training split,
    feature_std: torch.Tensor | None = None    # for built-in sets; None for user data

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features as the model sees them (standardised like the training data)."""
        x = torch.as_tensor(x, dtype=torch.float32)
        return x if self.feature_mean is None else (x - self.feature_mean) / self.feature_std

    @property
    def features(self) -> int:
        return int(self.x[0].numel())

    @property
    def outputs(self) -> int:
        """Width of the model output the data needs."""
        if self.task == CLASSIFICATION:
            return int(self.num_classes)
        return 1 if self.y.dim() == 1 else int(self.y[0].numel())

    def share_memory_(self) -> "TrainData":
        for tensor in (self.x, self.y, self.x_val, self.y_val):
            if tensor is not None:
                tensor.share_memory_()
        return self


def _xor(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The seed's XOR: points scattered around the four corners of the unit square."""
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 2, size=(n, 2))
    x = corners + rng.normal(0.0, 0.12, size=(n, 2))
    return x, corners[:, 0] ^ corners[:, 1]


def _sklearn(loader: str, **kwargs: Any) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        from sklearn import datasets  # imported on demand: it is slow to import

        out = getattr(datasets, loader)(**kwargs)
        return (out.data, out.target) if hasattr(out, "data") else out
    return load


BUILTINS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "xor": _xor,
    "moons": _sklearn("make_moons", n_samples=1000, noise=0.15, random_state=0),
    "circles": _sklearn("make_circles", n_samples=1000, noise=0.08, factor=0.5, random_state=0),
    "digits": _sklearn("load_digits"),
    "iris": _sklearn("load_iris"),
    "wine": _sklearn("load_wine"),
    "breast_cancer": _sklearn("load_breast_cancer"),
}


SYNTHETIC_OPTIONS = {"samples": 10000, "features": 20, "classes": 4}
_SYNTHETIC = re.compile(r"\s*synthetic\s*(?:\((.*)\))?\s*")


def synthetic_options(spec: str) -> dict[str, int] | None:
    """The options of ``"synthetic(samples=5000, classes=3)"`` (defaults filled in), or None
    when ``spec`` does not name the synthetic set."""
    match = _SYNTHETIC.fullmatch(spec)
    if not match:
        return None
    options = dict(SYNTHETIC_OPTIONS)
    for item in filter(str.strip, (match.group(1) or "").split(",")):
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in SYNTHETIC_OPTIONS or not eq:
            raise DataError(f"data={spec!r}: option {item.strip()!r} is not accepted; expected key=value "
                            f"with key one of {', '.join(SYNTHETIC_OPTIONS)}")
        try:
            options[key] = int(value)
        except ValueError:
            raise DataError(expected(f"synthetic.{key}", value, "an integer")) from None
    minimums = {"samples": 10, "features": 2, "classes": 2}
    for key, low in minimums.items():
        if options[key] < low:
            raise DataError(expected(f"synthetic.{key}", options[key], f"an integer >= {low}"))
    if options["samples"] < 5 * options["classes"]:
        raise DataError(f"synthetic.samples={options['samples']} is too few for {options['classes']} classes; "
                        f"expected at least {5 * options['classes']}")
    return options


def _synthetic(samples: int, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's make_classification: class clusters on the corners of a hypercube in
    the informative features, plus noise features; reproducible (random_state=0)."""
    from sklearn.datasets import make_classification

    informative = min(features, max(2, features // 2, math.ceil(math.log2(2 * classes))))
    if 2 * classes > 2 ** informative:
        raise DataError(f"synthetic: {classes} classes need more than {features} features "
                        f"(at least {math.ceil(math.log2(2 * classes))})")
    return make_classification(n_samples=samples, n_features=features, n_informative=informative,
                               n_redundant=0, n_classes=classes, random_state=0)


def is_builtin(name: str) -> bool:
    return name in BUILTINS or synthetic_options(name) is not None


def _named(name: str, label: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (X, y) of a built-in set, the synthetic set, or a data file."""
    if name in BUILTINS:
        x_np, y_np = BUILTINS[name]()
    elif (options := synthetic_options(name)) is not None:
        x_np, y_np = _synthetic(**options)
    elif datafiles.is_data_file(name):
        return datafiles.read(name, label)
    else:
        raise DataError(expected("data", name, tuple(BUILTINS) + ("synthetic(samples=, features=, classes=)",
                                                                  "a .csv, .npz or .pt file")))
    return torch.from_numpy(np.asarray(x_np, dtype=np.float32)), torch.from_numpy(np.asarray(y_np))


def _to_tensor(value: Any, field: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{field} cannot be turned into an array: {exc}") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise DataError(expected(f"{field}.dtype", str(array.dtype), "numbers (int, float or bool)"))
    return torch.from_numpy(np.ascontiguousarray(array))


def _split_pair(data: Any, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) from a tuple/list pair or a torch Dataset of (x, y) items."""
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0].detach().cpu(), data.tensors[1].detach().cpu()
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]  # materialised: small data sets only
        if not items or not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise DataError(f"{field}: a Dataset must yield (x, y) pairs")
        xs = torch.stack([_to_tensor(it[0], f"{field} x") for it in items])
        ys = torch.stack([_to_tensor(it[1], f"{field} y").reshape(()) if np.ndim(it[1]) == 0
                          else _to_tensor(it[1], f"{field} y") for it in items])
        return xs, ys
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _to_tensor(data[0], f"{field} X"), _to_tensor(data[1], f"{field} y")
    raise DataError(expected(field, type(data).__name__,
                             "an (X, y) pair of arrays or tensors, a torch Dataset, or a built-in "
                             f"name: {', '.join(BUILTINS)}"))


def _check_pair(x: torch.Tensor, y: torch.Tensor, field: str) -> None:
    if x.dim() < 2:
        raise DataError(f"{field} X must have one row per sample (2-D or more); got shape {tuple(x.shape)}")
    if len(x) != len(y):
        raise DataError(f"{field} X has {len(x)} rows but y has {len(y)}: they must be the same length")
    if len(x) == 0:
        raise DataError(f"{field} has no samples")
    row = first_nonfinite_row(x)
    if row is not None:
        raise DataError(f"{field} X has non-finite values (NaN or inf) in row {row}; "
                        "all features must be finite")


def first_nonfinite_row(x: torch.Tensor, chunk_elements: int = 1 << 20) -> int | None:
    """The first row of ``x`` holding NaN or ±inf, or None. Reads ``x`` in chunks of about
    ``chunk_elements`` and allocates nothing of its size: a data set may be most of the memory.
    A chunk's ``(part·0).sum()`` is 0 when every element is finite and NaN otherwise (inf·0 and
    NaN·0 are NaN), so no sum can overflow; only a chunk that fails is looked at row by row."""
    if not (x.is_floating_point() or x.is_complex()) or not len(x):
        return None  # integers are always finite
    rows = x.reshape(len(x), -1)
    step = max(1, chunk_elements // max(1, rows.shape[1]))
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        if not torch.isfinite(part.mul(0).sum()):
            bad = ~torch.isfinite(part).all(dim=1)
            return start + int(bad.nonzero()[0])
    return None


def _targets(y: torch.Tensor, loss: str | None, field: str) -> tuple[torch.Tensor, str]:
    """Targets as int64 labels (classification) or float32 values (regression)."""
    integral = not (y.is_floating_point() or y.is_complex())
    if loss == "mse" or (loss is None and not integral):
        if first_nonfinite_row(y.reshape(len(y), -1)) is not None:
            raise DataError(f"{field} y has non-finite values; regression targets must be finite")
        return y.float(), REGRESSION
    if not integral:  # an explicit classification loss with float targets
        if not torch.equal(y, y.round()):
            raise DataError(f"{field} y has class labels that are not integers (e.g. "
                            f"{float(y[y != y.round()][0])}); class labels must be integers >= 0")
    if y.dim() != 1:
        raise DataError(f"{field} y must be one class label per sample (1-D); got shape {tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{field} y has a negative class label ({int(y.min())}); "
                        "class labels must be integers >= 0")
    return y.long(), CLASSIFICATION


def prepare(data: Any, val: Any = None, *, seed: int = 0, val_fraction: float = 0.2,
            loss: str | None = None, label: str | None = None) -> TrainData:
    """Check and convert training (and validation) data.

    ``data``: a built-in name, ``"synthetic(samples=, features=, classes=)"``, the path of a
    .csv/.npz/.pt file (``label``: the CSV label column, default the last), an (X, y) pair, or
    a torch Dataset. ``val``: the same forms, a fraction of ``data`` to hold out, or None
    (named sets and files then hold out ``val_fraction``; other data gets no validation set).
    Named sets and files are standardised with statistics of their training split only.
    """
    if isinstance(data, TrainData):
        return data
    if label is not None and not (isinstance(data, str) and data.lower().endswith(".csv")):
        raise DataError(f"label={label!r} names a column of a .csv file; data={_short(data)} is not one")
    name = "data"
    standardise = False
    if isinstance(data, str):
        x, y = _named(data, label)
        name, standardise = data, True
        if val is None:
            val = val_fraction
    else:
        x, y = _split_pair(data, "data")
    _check_pair(x, y, name)
    y, task = _targets(y, loss, name)
    x = x.float()

    x_val = y_val = None
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        if not 0.0 <= val < 1.0:
            raise DataError(expected("val", val, "a fraction in [0, 1), (X, y) or a Dataset"))
        if val > 0:
            x, y, x_val, y_val = _holdout(x, y, val, seed, task)
    elif val is not None:
        x_val, y_val = _split_pair(val, "val")
        _check_pair(x_val, y_val, "val")
        y_val, val_task = _targets(y_val, loss if loss else ("mse" if task == REGRESSION else None), "val")
        if val_task != task or x_val.shape[1:] != x.shape[1:]:
            raise DataError(f"val does not match data: features {tuple(x_val.shape[1:])} vs "
                            f"{tuple(x.shape[1:])}, targets {val_task} vs {task}")
        x_val = x_val.float()

    mean = std = None
    if standardise:
        mean, std = x.mean(dim=0), x.std(dim=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant feature: scale 1
        x = (x - mean) / std
        if x_val is not None:
            x_val = (x_val - mean) / std
    num_classes = None
    if task == CLASSIFICATION:
        num_classes = int(max(y.max(), y_val.max() if y_val is not None and len(y_val) else 0)) + 1
    return TrainData(x.contiguous(), y.contiguous(),
                     None if x_val is None else x_val.contiguous(),
                     None if y_val is None else y_val.contiguous(), task, num_classes, name, mean, std)


def _short(data: Any) -> str:
    return repr(data) if isinstance(data, str) else type(data).__name__


def _holdout(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int, task: str):
    """A reproducible split holding out round(fraction·n) samples, stratified for
    classification: each class gives its share, rounded by largest remainder.

    Written with torch rather than scikit-learn's train_test_split to keep fit()'s start-up
    free of scikit-learn's import time (over a second).
    """
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.arange(len(x))] if task != CLASSIFICATION else \
        [(y == label).nonzero().flatten() for label in torch.unique(y)]
    wanted = round(fraction * len(x))
    exact = [fraction * len(g) for g in groups]
    quotas = [int(e) for e in exact]
    by_remainder = sorted(range(len(groups)), key=lambda i: quotas[i] - exact[i])  # largest first
    for i in by_remainder[:wanted - sum(quotas)]:
        quotas[i] += 1
    val_idx = torch.cat([g[torch.randperm(len(g), generator=generator)][:q] for g, q in zip(groups, quotas)])
    val_idx = val_idx.sort().values
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[val_idx] = False
    if not keep.any() or len(val_idx) == 0:
        raise DataError(f"cannot hold out val={fraction} of {len(x)} samples: one side would be empty")
    return x[keep], y[keep], x[val_idx], y[val_idx]
