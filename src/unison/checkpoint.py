"""Checkpoints on disk: atomic, checksummed, and free of pickle.

A checkpoint is a directory ``ckpt-<step>`` holding safetensors files (tensors), ``state.json``
(everything else) and ``MANIFEST.json`` (the SHA-256 and size of every other file). It is
written into a hidden temporary directory, every file fsync'ed, the manifest last, and only
then renamed into place: a checkpoint exists only once complete, as in PyTorch's distributed
checkpoint. A save that fails midway removes its temporary directory. Loading reads each file
once, checks it against the manifest and parses the bytes it checked.

The manifest protects against accidental corruption (a flipped byte), truncation (a full disk,
a killed copy) and a stranger's checkpoint that lists files outside it: loading reads only the
file names of the format (state.json, model.safetensors, replica-<rank> for rank < world_size),
only as regular files in the directory (no symlinks, pipes or devices), never more bytes than
declared; the JSON is size-capped and checked against a schema. Anything else is a
CheckpointError naming the checkpoint. It does not protect against a writer who recomputes the
checksums (a checksum is not a signature): that checkpoint may hold any tensors and values that
pass the schema. It cannot run code: nothing here unpickles; safetensors holds only tensors and
JSON only plain values (optimizer state dicts are flattened by ``flatten_optimizer``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import CheckpointError

FORMAT = "unison-checkpoint/1"
MANIFEST, STATE, MODEL = "MANIFEST.json", "state.json", "model.safetensors"
LOCK = "writer.lock"  # in the checkpoint folder itself (not a ckpt-* directory): who writes there
REPLICA_META = "unison"  # the key of a replica file's JSON in its safetensors metadata
MAX_WORLD_SIZE = 65536    # replicas a checkpoint may have
MANIFEST_LIMIT = 16 << 20  # bytes: room for MAX_WORLD_SIZE entries of ~150 bytes (10 MB)
STATE_LIMIT = 256 << 20    # bytes: the settings and the history, ~250 bytes a round (1M rounds)
_NAME = re.compile(r"ckpt-(\d{9})")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def replica_file(rank: int) -> str:
    return f"replica-{rank}.safetensors"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt or incomplete) and an older one used."""


@dataclass
class Checkpoint:
    """A checkpoint read back and verified: its tensors and its state."""

    path: Path
    step: int
    state: dict[str, Any]                    # state.json
    model: dict[str, torch.Tensor]           # the merged model's state_dict
    replicas: list[dict[str, torch.Tensor]]  # per rank: optimizer tensors, buffers, RNG states
    replica_meta: list[dict[str, Any]]       # per rank: the JSON part (optimizer settings, ...)


def directory_name(step: int) -> str:
    return f"ckpt-{step:09d}"


# ---- what the JSON files may hold: key -> (what it must be, test, required) ----------------

def _int(low: int, high: float = float("inf")) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and low <= v <= high  # type(), as True is an int too


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda v: type(v) is kind


def _objects(v: Any) -> bool:
    return type(v) is list and all(type(x) is dict for x in v)


_MANIFEST_SCHEMA = {
    "format": (repr(FORMAT), lambda v: v == FORMAT, True),
    "step": ("an int >= 0", _int(0), True),
    "files": ("an object mapping file names to {sha256, bytes}", _is(dict), True),
}
_ENTRY_SCHEMA = {
    "sha256": ("64 lowercase hex digits", lambda v: type(v) is str and bool(_SHA256.fullmatch(v)), True),
    "bytes": ("an int >= 0", _int(0), True),
}
# What load() and the resume check (unison.recovery) use. The loader needs the first three;
# the others are the trainer's and checked where present (a checkpoint may hold other state).
_STATE_SCHEMA = {
    "format": (repr(FORMAT), lambda v: v == FORMAT, True),
    "step": ("an int >= 0", _int(0), True),
    "world_size": (f"an int from 1 to {MAX_WORLD_SIZE}", _int(1, MAX_WORLD_SIZE), True),
    "steps_per_epoch": ("an int >= 1", _int(1), False),
    "epoch_end": ("a bool", _is(bool), False),
    "samples_seen": ("an int >= 0", _int(0), False),
    "rounds": ("an int >= 0", _int(0), False),
    "history": ("a list of objects", _objects, False),
    "config": ("an object", _is(dict), False),
    "data": ("a string", _is(str), False),
}
_REPLICA_SCHEMA = {  # the JSON in each replica file's metadata (unison.recovery writes it)
    "optimizer": ("an object with param_groups (a list of objects) and scalars (an object of objects)",
                  lambda v: type(v) is dict and _objects(v.get("param_groups"))
                  and type(v.get("scalars")) is dict and _objects(list(v["scalars"].values())), False),
    "bytes_sent": ("an int >= 0", _int(0), False),
    "nan": ("an object with ints rollbacks and discarded >= 0",
            lambda v: type(v) is dict and _int(0)(v.get("rollbacks")) and _int(0)(v.get("discarded")), False),
}


def _check(value: Any, schema: dict[str, tuple[str, Callable[[Any], bool], bool]], path: Path,
           what: str) -> dict[str, Any]:
    """``value`` if it is a dict whose keys pass ``schema``; else CheckpointError saying why."""
    if type(value) is not dict:
        raise _bad(path, f"{what} must be a JSON object, not {_show(value)}")
    for key, (must, test, required) in schema.items():
        if key not in value:
            if required:
                raise _bad(path, f"{what} lacks {key!r}")
        elif not test(value[key]):
            raise _bad(path, f"{what}: {key} must be {must}, not {_show(value[key])}")
    return value


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: {problem}")


def _show(value: Any, most: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= most else text[:most] + "..."


# ---- writing -------------------------------------------------------------------------------

def save(directory: str | Path, step: int, state: dict[str, Any], model: dict[str, torch.Tensor],
         replicas: list[bytes], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically under ``directory``; keep the newest ``keep``.

    ``replicas`` are each replica's tensors already serialised with safetensors (they arrive
    as bytes from the other workers). Returns the checkpoint's path. A save that fails leaves
    no temporary directory behind and the checkpoints already there as they were.
    """
    directory = Path(directory)
    final = directory / directory_name(step)
    encoded = json.dumps({"format": FORMAT, "step": step, **state}).encode()
    _writable(final, json.loads(encoded), len(encoded), len(replicas))  # what load() would refuse
    directory.mkdir(parents=True, exist_ok=True)
    # copies: safetensors refuses tensors that share memory (tied weights)
    files = {MODEL: save_tensors({k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.items()}),
             STATE: encoded}
    files.update({replica_file(rank): blob for rank, blob in enumerate(replicas)})
    temporary = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        manifest = {"format": FORMAT, "step": step, "files": {}}
        for name, data in files.items():
            _write(temporary / name, data)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _write(temporary / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: it seals the rest
        _fsync_directory(temporary)
        _replace(temporary, final)
    except BaseException:  # a full disk, say: free what this save took, keep what was there
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(directory)
    prune(directory, keep, newest=step)
    return final


def _writable(final: Path, state: dict[str, Any], size: int, replicas: int) -> None:
    """Refuse to write a checkpoint that load() would refuse to read."""
    _check(state, _STATE_SCHEMA, final, STATE)
    if size > STATE_LIMIT:
        raise _bad(final, f"{STATE} would have {size} bytes, over STATE_LIMIT={STATE_LIMIT}")
    if state["world_size"] != replicas:
        raise _bad(final, f"world_size is {state['world_size']} but {replicas} replica files were given")


def _replace(temporary: Path, final: Path) -> None:
    """Rename ``temporary`` to ``final``. One already there (left by an abandoned attempt: we
    resumed from an older step) is removed only once replaced, and restored if that fails."""
    stale = final.with_name(f".{final.name}.old-{os.getpid()}")
    moved = final.exists()
    if moved:
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
    try:
        temporary.rename(final)
    except BaseException:
        if moved:
            stale.rename(final)
        raise
    shutil.rmtree(stale, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as sink:
        sink.write(data)
        sink.flush()
        os.fsync(sink.fileno())


def _fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX needs the directory synced)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(handle)


def prune(directory: str | Path, keep: int, newest: int) -> None:
    """Keep the ``keep`` newest checkpoints up to step ``newest``; drop the rest, newer ones too
    (they belong to an attempt that was abandoned by resuming from an older step), and the
    temporary directories of interrupted saves."""
    directory = Path(directory)
    steps = steps_on_disk(directory)
    kept = [s for s in steps if s <= newest][:keep]
    for step in steps:
        if step not in kept:  # renamed first: a kill during the removal leaves no half checkpoint
            doomed = directory / f".{directory_name(step)}.pruned-{os.getpid()}"
            try:
                (directory / directory_name(step)).rename(doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
    for leftover in directory.glob(".ckpt-*"):  # one writer per run, and it has finished
        shutil.rmtree(leftover, ignore_errors=True)


# ---- one writer per checkpoint folder --------------------------------------------------------

def lock(directory: str | Path) -> Path:
    """Claim ``directory`` for this process's checkpoints: a file ``writer.lock`` created with
    O_EXCL, holding this process's PID and host. Another live writer's lock is a CheckpointError
    naming it; one left by a dead process on this host is taken over with a CheckpointWarning.
    Release it with ``unlock``. (Two writers would each prune the other's checkpoints.)"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    for _ in range(3):  # a stale lock removed, then created by us (or a racing writer)
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None or _alive(holder):
                raise CheckpointError(_held_message(directory, holder)) from None
            warnings.warn(f"checkpoint_dir={str(directory)!r}: taking over the lock of process "
                          f"{holder['pid']} on this host, which is no longer running", CheckpointWarning,
                          stacklevel=2)
            path.unlink(missing_ok=True)
            continue
        try:  # a lock that could not be written (a full disk) would refuse every later run
            written = os.write(handle, mine)
            if written != len(mine):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(mine)} bytes", str(path))
        except BaseException:
            os.close(handle)
            path.unlink(missing_ok=True)
            raise
        os.close(handle)
        return path
    raise CheckpointError(_held_message(directory, _holder(path)))


def unlock(directory: str | Path) -> None:
    """Release ``lock(directory)``; a lock that another process holds now is left alone."""
    path = Path(directory) / LOCK
    holder = _holder(path)
    if holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        path.unlink(missing_ok=True)


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's {pid, host}; None when it cannot be read as one (refused: it may be live)."""
    try:
        with open(os.open(path, _OPEN), "rb") as source:
            value = json.loads(source.read(4096))
    except (OSError, ValueError):
        return None
    if type(value) is dict and _int(1)(value.get("pid")) and type(value.get("host")) is str:
        return value
    return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process may still be running (always so on another host)."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def _held_message(directory: Path, holder: dict[str, Any] | None) -> str:
    who = (f"process {holder['pid']} on host {holder['host']!r}" if holder is not None
           else "another process (its lock file cannot be read)")
    return (f"checkpoint_dir={str(directory)!r} is being written by {who}: two runs writing one "
            "checkpoint folder would delete each other's checkpoints; wait for it to finish, or "
            f"choose another checkpoint_dir (if that process is gone, remove {str(directory / LOCK)!r})")


# ---- reading -------------------------------------------------------------------------------

def steps_on_disk(directory: str | Path) -> list[int]:
    """Steps of the (complete-looking) checkpoints in ``directory``, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(steps, reverse=True)


def load(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint directory; CheckpointError says what is wrong."""
    path = Path(path)
    try:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _bad(path, f"cannot be opened as a directory ({exc.strerror})") from None
    try:  # every file is opened relative to the directory opened here
        return _load(folder, path)
    finally:
        os.close(folder)


def _load(folder: int, path: Path) -> Checkpoint:
    manifest = _check(_json(_read(folder, path, MANIFEST, MANIFEST_LIMIT), path, MANIFEST),
                      _MANIFEST_SCHEMA, path, MANIFEST)
    step, listed = manifest["step"], manifest["files"]
    named = _NAME.fullmatch(path.name)
    if named and int(named[1]) != step:
        raise _bad(path, f"{MANIFEST} is for step {step}, the directory's name for step {int(named[1])}")
    for name, entry in listed.items():
        _check(entry, _ENTRY_SCHEMA, path, f"{MANIFEST} entry {_show(name)}")
    if STATE not in listed:
        raise _bad(path, f"{MANIFEST} does not list {STATE}")
    if (size := listed[STATE]["bytes"]) > STATE_LIMIT:  # refused before it is read
        raise _bad(path, f"{MANIFEST} says {STATE} has {size} bytes, over STATE_LIMIT={STATE_LIMIT}")
    state = _check(_json(_verified(folder, path, STATE, listed[STATE]), path, STATE),
                   _STATE_SCHEMA, path, STATE)
    if state["step"] != step:
        raise _bad(path, f"{STATE} is for step {state['step']}, the manifest for step {step}")
    ranks = range(state["world_size"])
    expected = {STATE, MODEL, *(replica_file(rank) for rank in ranks)}
    if unknown := sorted(set(listed) - expected):
        raise _bad(path, f"{MANIFEST} lists {_show(unknown[0])}, which is not a file of this format "
                         f"(with world_size={len(ranks)}); refused unread")
    if missing := sorted(expected - set(listed)):
        raise _bad(path, f"{MANIFEST} does not list {missing[0]}")
    model = _tensors(path, MODEL, _verified(folder, path, MODEL, listed[MODEL]))
    replicas, replica_meta = [], []
    for name in map(replica_file, ranks):
        blob = _verified(folder, path, name, listed[name])
        replicas.append(_tensors(path, name, blob))
        replica_meta.append(_replica_meta(path, name, blob))
    return Checkpoint(path=path, step=step, state=state, model=model, replicas=replicas,
                      replica_meta=replica_meta)


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no link, no wait for a writer


def _regular(info: os.stat_result, path: Path, name: str) -> os.stat_result:
    if not stat.S_ISREG(info.st_mode):
        kind = next((kind for test, kind in _KINDS if test(info.st_mode)), "not a plain file")
        raise _bad(path, f"{name} is {kind}, not a regular file; refused unread")
    return info


def _read(folder: int, path: Path, name: str, most: int, exact: bool = False) -> bytes:
    """Regular file ``name`` in the directory open as ``folder``: at most ``most`` bytes, or
    with ``exact`` exactly that many (the manifest's size); its size + 1 read at most."""
    try:
        _regular(os.stat(name, dir_fd=folder, follow_symlinks=False), path, name)  # before opening
        with open(os.open(name, _OPEN, dir_fd=folder), "rb") as source:
            size = _regular(os.fstat(source.fileno()), path, name).st_size  # what was opened
            if exact and size != most:
                raise _bad(path, f"{name} has {size} bytes, the manifest says {most} "
                                 "(truncated or overwritten)")
            if size > most:
                raise _bad(path, f"{name} has more than {most} bytes, the most this unison reads")
            data = source.read(size + 1)  # +1: to notice a file that grew since the fstat
    except CheckpointError:  # an OSError too: pass it on as it is
        raise
    except FileNotFoundError:
        raise _bad(path, f"{name} is missing: the checkpoint is incomplete") from None
    except OSError as exc:
        raise _bad(path, f"cannot read {name} ({exc.strerror})") from None
    except MemoryError:
        raise _bad(path, f"{name} ({most} bytes) does not fit in memory") from None
    if len(data) != size:
        raise _bad(path, f"{name} changed while it was read (truncated or overwritten)")
    return data


def _verified(folder: int, path: Path, name: str, entry: dict[str, Any]) -> bytes:
    """File ``name``'s bytes, once they match their manifest ``entry`` (size and SHA-256)."""
    data = _read(folder, path, name, entry["bytes"], exact=True)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _bad(path, f"{name} does not match its SHA-256 in {MANIFEST} (the file is corrupt)")
    return data


def _json(data: bytes | str, path: Path, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise _bad(path, f"{what} is not valid JSON ({_show(str(exc), 120)})") from None


def _tensors(path: Path, name: str, blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(blob)
    except Exception as exc:  # noqa: BLE001 - checksummed yet unparsable: written by something else
        raise _bad(path, f"{name} cannot be parsed as safetensors ({_show(str(exc), 120)})") from None


def _replica_meta(path: Path, name: str, blob: bytes) -> dict[str, Any]:
    """The JSON a replica file carries in its safetensors metadata, checked."""
    what = f"{name}'s {REPLICA_META!r} metadata"
    try:
        text = _safetensors_metadata(blob)[REPLICA_META]
    except (KeyError, TypeError, ValueError, RecursionError):
        text = None
    if type(text) is not str:
        raise _bad(path, f"{name} lacks its {REPLICA_META!r} metadata")
    return _check(_json(text, path, what), _REPLICA_SCHEMA, path, what)


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes: an 8-byte little-endian header length, then a
    JSON header (the format's specification); safetensors.torch.load returns tensors only."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + size]).get("__metadata__") or {}


def load_latest(directory: str | Path, report: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that verifies, or None if there is none at all.

    A newer one that fails verification is reported (a CheckpointWarning by default) and the
    next older one tried; if every checkpoint there is bad, CheckpointError lists why.
    """
    report = report or (lambda message: warnings.warn(message, CheckpointWarning, stacklevel=3))
    problems = []
    for step in steps_on_disk(directory):
        try:
            checkpoint = load(Path(directory) / directory_name(step))
        except CheckpointError as exc:
            problems.append(str(exc))
            report(f"{exc}; trying the previous checkpoint")
            continue
        return checkpoint
    if problems:
        raise CheckpointError(f"no usable checkpoint in {str(directory)!r}: " + "; ".join(problems))
    return None


def latest_valid_path(directory: str | Path | None) -> Path | None:
    """The newest checkpoint that verifies, for error messages; None if none (never raises)."""
    if directory is None:
        return None
    for step in steps_on_disk(directory):
        try:
            return load(Path(directory) / directory_name(step)).path
        except CheckpointError:
            continue
    return None


# ---- optimizer state dicts as tensors + JSON -----------------------------------------------

def flatten_optimizer(state_dict: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (keyed ``prefix<param>/<name>``) and JSON."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _plain(value, f"optimizer state {name!r}")
    groups = [{k: _plain(v, f"optimizer param_groups {k!r}") for k, v in g.items()}
              for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The inverse of flatten_optimizer: a dict ``optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, _, name = key[len(prefix):].partition("/")
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _plain(value: Any, what: str) -> Any:
    """A JSON value, or CheckpointError naming what cannot be stored without pickle."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    raise CheckpointError(f"{what} holds a {type(value).__name__}, which a checkpoint cannot store "
                          "without pickle; use numbers, strings, booleans or lists")
