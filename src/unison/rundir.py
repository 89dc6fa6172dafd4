"""Run directories: a default name, a refusal to touch an existing one, and atomic replacement.

A run is written into a scratch directory next to its target; the target appears (or replaces
an old one, with ``overwrite``) only once everything in it has been written.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .errors import ConfigError


def default_out(kind: str) -> Path:
    """``runs/<date-time>-<kind>``, e.g. runs/20250101-120000-compare."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def check_free(out: Path, overwrite: bool) -> None:
    """Refuse an existing directory unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ConfigError(f"run directory {str(out)!r} already exists; pass --overwrite (overwrite=True) "
                          "to replace it or choose another --out")


def scratch_for(out: Path) -> Path:
    """A fresh directory next to ``out`` to write the run into."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is removed only once ``new`` is in place."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
