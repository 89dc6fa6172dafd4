"""Run folders: default names, scratch folders, atomic replacement, and unfinished runs.

A run is written into a scratch folder next to its target; the target appears (or replaces an
old one, with ``overwrite``) only once everything in it has been written. `unison compare`
writes into a private scratch folder (``.<name>.partial-<pid>``) removed on failure. `unison
train` with checkpoints trains in ``.<name>.partial``: its name is known to every rank and to a
later ``unison train --resume <name>``, it holds the resolved ``config.toml`` from the start and
``checkpoints/``, and a failure leaves it in place to be continued.

Before anything trains, the target is checked: its folder must be writable and the target
replaceable (not ``/`` or a mount point). What a killed run left next to it is cleared first:
a ``.<name>.partial-<pid>`` or ``.<name>.old-<pid>`` of a process that is gone is removed, unless
the target is missing, when ``.<name>.old-<pid>`` is the old run itself and is put back. (The
``.<name>.partial`` of an unfinished run with checkpoints is kept: ``--resume`` continues it.)
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from pathlib import Path

from .errors import ConfigError

CONFIG_FILE = "config.toml"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>old|partial)-(?P<pid>\d+)")


class RunDirWarning(UserWarning):
    """Something a killed run left next to a run folder was removed or put back."""


def default_out(kind: str) -> Path:
    """``runs/<date-time>-<kind>``, e.g. runs/20250101-120000-compare."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


def check_free(out: Path, overwrite: bool) -> None:
    """Refuse an existing directory unless ``overwrite``, and a target that cannot be written;
    first clear what a killed run left next to it."""
    check_writable(out, overwrite)
    clear_leftovers(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"run directory {str(out)!r} already exists; pass --overwrite (overwrite=True) "
                          "to replace it or choose another --out")


def check_writable(out: Path, overwrite: bool) -> None:
    """ConfigError, before anything trains, for a run folder that could not be written or put
    in place: a folder that is not writable (permissions, a read-only filesystem), ``/`` or a
    mount point to replace."""
    target = Path(os.path.abspath(out))
    if target.parent == target:
        raise ConfigError(f"out={str(out)!r} (--out) is the filesystem root; a run directory must be a "
                          "folder inside another one, e.g. --out runs/first")
    if overwrite and os.path.ismount(target):
        raise ConfigError(f"out={str(out)!r} (--out) is a mount point, which cannot be replaced; "
                          "choose a folder inside it")
    folder = target.parent
    while not folder.exists():  # the run's folders are created up to here
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"out={str(out)!r} (--out) cannot be created: {str(folder)!r} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "is on a read-only filesystem" if _read_only(folder) else "is not writable by this user"
        raise ConfigError(f"out={str(out)!r} (--out) cannot be written: {str(folder)!r} {why}")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:  # pragma: no cover - a filesystem without statvfs
        return False


def clear_leftovers(out: Path) -> list[Path]:
    """Remove the ``.<name>.partial-<pid>`` and ``.<name>.old-<pid>`` that a killed run (its
    process gone) left next to ``out``; an ``.old`` one is put back as ``out`` if ``out`` is
    missing (a kill between replace_dir's two renames). Each is reported (a RunDirWarning);
    returns what was removed or put back."""
    if not out.parent.is_dir():
        return []
    found = []
    for path in sorted(out.parent.iterdir()):  # .old before .partial
        match = _LEFTOVER.fullmatch(path.name)
        if match and match["name"] == out.name and not _running(int(match["pid"])):
            found.append((match["kind"], int(match["pid"]), path))
    for kind, pid, path in found:
        if kind == "old" and not os.path.lexists(out):
            path.rename(out)
            warnings.warn(f"{str(out)!r} was missing and {str(path)!r} held it (process {pid} was killed "
                          f"while replacing it): put back as {str(out)!r}", RunDirWarning, stacklevel=3)
        else:
            _remove(path)
            warnings.warn(f"removed {str(path)!r}, left by process {pid} that was killed while writing "
                          f"{str(out)!r}", RunDirWarning, stacklevel=3)
    return [path for _, _, path in found]


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file or a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
    if old is not None:  # a plain file given as the target is removed too
        _remove(old)


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
