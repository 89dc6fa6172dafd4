"""Checkpoints on disk: atomic, checksummed, and free of pickle.

A checkpoint is a directory ``ckpt-<step>`` holding safetensors files (tensors), ``state.json``
(everything else) and ``MANIFEST.json`` (the SHA-256 and size of every other file). It is
written into a hidden temporary directory, every file fsync'ed, the manifest last, and only
then renamed into place: a checkpoint exists only once complete, as in PyTorch's distributed
checkpoint, where a checkpoint is valid once its metadata is atomically in place. A save that
fails midway removes its temporary directory. Loading reads each file once, checks it against
the manifest and parses the bytes it checked, so a truncated file or a flipped byte is refused
with CheckpointError instead of loaded.

Nothing here unpickles: safetensors holds only tensors and JSON only plain values, so a
checkpoint from a stranger cannot run code. Optimizer state dicts are flattened into tensors
plus JSON (``flatten_optimizer``) and rebuilt on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
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
REPLICA_META = "unison"  # the key of a replica file's JSON in its safetensors metadata
_NAME = re.compile(r"ckpt-(\d{9})")


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
        if step not in kept:
            shutil.rmtree(directory / directory_name(step), ignore_errors=True)
    for leftover in directory.glob(".ckpt-*"):  # one writer per run, and it has finished
        shutil.rmtree(leftover, ignore_errors=True)


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
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        listed = manifest["files"]
        step = int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {MANIFEST}: it is incomplete") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {MANIFEST} is unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {manifest.get('format')!r}; "
                              f"this unison reads {FORMAT!r}")
    contents = {}
    for name, expected in listed.items():
        try:
            data = (path / name).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {name} ({exc.strerror})") from None
        if len(data) != expected.get("bytes"):
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} has {len(data)} bytes, the manifest "
                                  f"says {expected.get('bytes')} (truncated or overwritten)")
        if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} does not match its SHA-256 in "
                                  f"{MANIFEST} (the file is corrupt)")
        contents[name] = data
    try:
        state = json.loads(contents[STATE])
        model = load_tensors(contents[MODEL])
        blobs = [contents[replica_file(rank)] for rank in range(int(state["world_size"]))]
        replicas = [load_tensors(blob) for blob in blobs]
        replica_meta = [json.loads(_safetensors_metadata(blob)[REPLICA_META]) for blob in blobs]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {exc.args[0]}") from None
    except Exception as exc:  # noqa: BLE001 - checksummed yet unparsable: written by something else
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be parsed: {exc}") from None
    if state.get("step") != step:
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE} is for step {state.get('step')}, "
                              f"the manifest for step {step}")
    return Checkpoint(path=path, step=step, state=state, model=model, replicas=replicas,
                      replica_meta=replica_meta)


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes: an 8-byte little-endian header length, then a
    JSON header (the format's specification); safetensors.torch.load returns tensors only."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + size]).get("__metadata__", {})


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
