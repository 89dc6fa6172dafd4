"""The namespace that model files named by path (``class_path = "cnn.py:Net"``) are imported
under: ``unison.modelfiles.<stem>_<hex of the file's absolute path>``.

The name says where the file is, so any process can import it again: a worker process that
unpickles the model's class by its module name imports this module first (it is the name's
parent), which installs the finder below, which maps the name back to the file. Nothing but
the name travels; the driver imports the file the same way.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path

__path__: list[str] = []  # a package without a folder: its submodules come from the finder below


def module_name(path: str | Path) -> str:
    """The stable module name of the .py file at ``path`` (made absolute)."""
    path = Path(path).resolve()
    stem = re.sub(r"\W", "_", path.stem) or "m"
    return f"{__name__}.{stem}_{str(path).encode().hex()}"


def file_of(name: str) -> Path | None:
    """The file that ``module_name`` encoded in ``name``, or None for another name."""
    prefix, _, last = name.rpartition(".")
    if prefix != __name__ or "_" not in last:
        return None
    try:
        return Path(bytes.fromhex(last.rpartition("_")[2]).decode())
    except ValueError:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: D102 - the importlib protocol
        file = file_of(name)
        if file is None or not file.is_file():
            return None
        return importlib.util.spec_from_file_location(name, file)


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
