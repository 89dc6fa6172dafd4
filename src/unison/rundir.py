"""Run folders: default names, scratch folders, atomic replacement, and unfinished runs.

A run is written into a scratch folder next to its target; the target appears (or replaces an
old one, with ``overwrite``) only once everything in it has been written. `unison compare`
writes into a private scratch folder (``.<name>.partial-<pid>``) removed on failure. `unison
train` with checkpoints trains in ``.<name>.partial``: its name is known to every rank and to a
later ``unison train --resume <name>``, it holds the resolved ``config.toml`` from the start and
``checkpoints/``, and a failure leaves it in place to be continued.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .errors import ConfigError

CONFIG_FILE = "config.toml"


def default_out(kind: str) -> Path:
    """``runs/<date-time>-<kind>``, e.g. runs/20250101-120000-compare."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def check_free(out: Path, overwrite: bool) -> None:
    """Refuse an existing directory unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ConfigError(f"run directory {str(out)!r} already exists; pass --overwrite (overwrite=True) "
                          "to replace it or choose another --out")


def scratch_for(out: Path) -> Path:
    """A fresh folder next to ``out``, private to this process, to write the run into."""
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


def partial_dir(out: Path) -> Path:
    """Where an unfinished `unison train` run with checkpoints lives until it succeeds."""
    return out.parent / f".{out.name}.partial"


def run_dir_of(path: str | Path) -> Path:
    """The run directory a ``--resume`` argument means: the run directory or its partial one."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(".partial"):
        return path.parent / path.name[1:-len(".partial")]
    return path


def training_dir(out: Path, *, checkpointing: bool, resume: bool, overwrite: bool, restarted: bool,
                 writer: bool = True) -> Path:
    """The folder a `unison train` run trains in; refuses what would lose or mix up an earlier run.

    Only the writer checks (and may clear an old partial run): it alone writes there, and the
    other ranks of a torchrun group would race with it.
    """
    if not writer:
        return partial_dir(out) if checkpointing else scratch_for(out)
    check_free(out, overwrite)
    if not checkpointing:
        if resume:
            raise ConfigError("--resume needs a run with checkpoints (train.checkpoint_every)")
        return scratch_for(out)
    partial = partial_dir(out)
    if resume or restarted:
        if resume and not (partial / CONFIG_FILE).exists():
            raise ConfigError(f"no unfinished run to resume for {str(out)!r} (expected {str(partial)!r})")
        return partial
    if partial.exists():
        if not overwrite:
            raise ConfigError(f"an unfinished run of {str(out)!r} is in {str(partial)!r}: continue it with "
                              f"`unison train --resume {out}`, or pass --overwrite to start over")
        shutil.rmtree(partial)
    return partial


def resume_config(out: Path) -> Path:
    """The resolved run file an unfinished run wrote when it started."""
    path = partial_dir(out) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"no unfinished run to resume for {str(out)!r} (expected {str(path)!r})")
    return path
