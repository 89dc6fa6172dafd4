"""Data sets read from files: ``.csv`` (a header, one label column), ``.npz`` (arrays X, y)
and ``.pt`` (a dict with X and y, or an (X, y) pair, of tensors).

Each reader returns raw (X, y) tensors; data.prepare() checks, splits and standardises them
like the built-in sets. Every problem is a DataError that names the file and what is wrong.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

SUFFIXES = (".csv", ".npz", ".pt")


def is_data_file(name: str) -> bool:
    return Path(name).suffix.lower() in SUFFIXES


def read(path: str | Path, label: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) from a data file; ``label`` names the CSV label column (default: the last)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    if label is not None and suffix != ".csv":
        raise DataError(f"{path}: label={label!r} applies to .csv files only; {suffix} files hold arrays X and y")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    return {".csv": _read_csv, ".npz": _read_npz, ".pt": _read_pt}[suffix](path, label)


def _read_csv(path: Path, label: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        # utf-8-sig: Excel and Windows editors start a CSV with a byte-order mark, which
        # would otherwise stay in the first column's name ("\ufeffa", so label="a" fails)
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row]  # blank lines are not samples
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty; expected a header row and one row per sample")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if not body:
        raise DataError(f"{path}: has a header but no data rows")
    if len(header) < 2:
        raise DataError(f"{path}: has {len(header)} column; expected at least one feature and a label column")
    column = len(header) - 1 if label is None else _label_index(path, header, label)
    for number, row in enumerate(body, start=2):  # line 1 is the header
        if len(row) != len(header):
            raise DataError(f"{path}: row {number} has {len(row)} fields but the header has {len(header)}; "
                            "every row needs one value per column")
    features = [[value for i, value in enumerate(row) if i != column] for row in body]
    names = [name for i, name in enumerate(header) if i != column]
    x = _numbers(path, features, names)
    labels = [row[column].strip() for row in body]
    if "" in labels:
        raise DataError(f"{path}: row {labels.index('') + 2} has no value in label column {header[column]!r}")
    y = _labels(labels)
    return torch.from_numpy(x), y


def _label_index(path: Path, header: list[str], label: str) -> int:
    if label not in header:
        raise DataError(f"{path}: has no label column {label!r}; columns: {', '.join(header)}")
    return header.index(label)


def _numbers(path: Path, rows: list[list[str]], names: list[str]) -> np.ndarray:
    try:
        return np.asarray(rows, dtype=np.float32)
    except ValueError:
        pass
    for number, row in enumerate(rows, start=2):  # find the first bad cell to name it
        for name, value in zip(names, row):
            try:
                float(value)
            except ValueError:
                raise DataError(f"{path}: row {number}, column {name!r}: {value!r} is not a number; "
                                "feature values must be numeric") from None
    raise DataError(f"{path}: feature values cannot be read as numbers")  # pragma: no cover


def _labels(values: list[str]) -> torch.Tensor:
    """Integer labels stay classes, other numbers are regression targets, and text labels
    become classes numbered in sorted order (``setosa`` → 0, ``versicolor`` → 1, ...)."""
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    except ValueError:
        pass
    try:  # non-finite targets are refused later, with the other checks
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    except ValueError:
        pass
    classes = {name: i for i, name in enumerate(sorted(set(values)))}
    return torch.tensor([classes[v] for v in values], dtype=torch.int64)


def _read_npz(path: Path, label: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [key for key in ("X", "y") if key not in arrays.files]
            if missing:
                raise DataError(f"{path}: has no array {missing[0]!r} (found: {', '.join(arrays.files) or 'none'}); "
                                "expected arrays named X and y")
            x, y = arrays["X"], arrays["y"]
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file of numeric arrays ({exc})") from None
    return _numeric(path, x, "X"), _numeric(path, y, "y")


def _numeric(path: Path, array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: array {name} has dtype {array.dtype}; expected numbers (int, float or bool)")
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_pt(path: Path, label: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise DataError(f"{path}: not a readable .pt file of tensors ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(content, dict) and {"X", "y"} <= set(content):
        x, y = content["X"], content["y"]
    elif isinstance(content, (tuple, list)) and len(content) == 2:
        x, y = content
    else:
        found = f"a dict with keys {sorted(map(str, content))}" if isinstance(content, dict) else type(content).__name__
        raise DataError(f"{path}: holds {found}; expected a dict with tensors 'X' and 'y' or an (X, y) pair")
    for name, value in (("X", x), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: {name} is a {type(value).__name__}; expected a tensor")
        if value.is_complex() or not (value.is_floating_point() or value.dtype in
                                      (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise DataError(f"{path}: tensor {name} has dtype {value.dtype}; expected numbers")
    return x, y
