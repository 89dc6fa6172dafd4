"""Where `unison train` trains, so that a run that fails can be continued with ``--resume``.

A run directory appears (or replaces an old one) only when its run has succeeded; until then
the run lives in a scratch directory next to it. Without checkpoints the scratch directory is
private to the process and removed on failure. With checkpoints it is ``.<name>.partial``:
its name is known to every rank and to a later ``unison train --resume <name>``, it holds the
resolved ``config.toml`` from the start and ``checkpoints/``, and a failure leaves it in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ConfigError

CONFIG_FILE = "config.toml"


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def run_dir_of(path: str | Path) -> Path:
    """The run directory a ``--resume`` argument means: the run directory or its partial one."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(".partial"):
        return path.parent / path.name[1:-len(".partial")]
    return path


def scratch_for(out: Path, *, checkpointing: bool, resume: bool, overwrite: bool, restarted: bool,
                rank0: bool = True) -> Path:
    """The directory this run trains in; refuses what would lose or mix up an earlier run.

    Only rank 0 checks (and may clear an old partial run): it alone writes there, and the other
    ranks of a torchrun group would race with it.
    """
    if not rank0:
        return partial_dir(out) if checkpointing else out.parent / f".{out.name}.partial-{os.getpid()}"
    if out.exists() and not overwrite:
        raise ConfigError(f"run directory {str(out)!r} already exists; pass --overwrite to replace it "
                          "or choose another --out")
    if not checkpointing:
        if resume:
            raise ConfigError("--resume needs a run with checkpoints (train.checkpoint_every)")
        return out.parent / f".{out.name}.partial-{os.getpid()}"
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
