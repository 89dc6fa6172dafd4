"""`unison train|demo`: a thin layer that maps a TOML run file and flags onto fit().

Every unison error becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from . import config as run_config
from .errors import ConfigError, UnisonError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other unison error
        self.exit(2, f"unison: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unison", description="Train replicas of a network in parallel and merge them.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train one run described by a TOML file")
    train.add_argument("run_file", nargs="?", help="TOML with [data], [model] and [train] tables")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the unfinished run that had --out RUN_DIR from its last checkpoint")
    train.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set train.lr=0.1 (repeatable)")
    train.add_argument("--out", help="run directory (default runs/<date-time>-train)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = commands.add_parser("demo", help="the seed's sample run")
    demo.add_argument("name", choices=["xor"], help="which demo")
    demo.add_argument("--backend", default="threads", choices=run_config.BACKENDS[:2])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _demo(args)
    except UnisonError as exc:
        print(f"unison: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unison: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from . import unfinished
    from .api import RESUME_HINT, fit
    from .data import prepare
    from .errors import WorkerError
    from .launch.torchrun import is_rank0, restart_count
    from .launch.torchrun import world_size as torchrun_world_size
    from .models import mlp

    if (args.run_file is None) == (args.resume is None):
        raise ConfigError("train needs a run file, or --resume RUN_DIR to continue an unfinished run (not both)")
    if args.resume and args.out:
        raise ConfigError("--resume RUN_DIR continues into RUN_DIR; leave out --out")
    resume_out = unfinished.run_dir_of(args.resume) if args.resume else None
    cfg = run_config.load(unfinished.resume_config(resume_out) if args.resume else args.run_file, args.sets)
    under_torchrun = torchrun_world_size() is not None
    if under_torchrun and cfg.train.backend != "torchrun":
        # The same run file works alone and under torchrun: torchrun decides the workers.
        cfg = run_config.from_dict(cfg.to_dict(), {"train.backend": "torchrun",
                                                   "train.workers": torchrun_world_size()})
    rank0 = is_rank0()
    out = resume_out or Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-train")
    t = cfg.train
    checkpointing = t.checkpoint_every is not None or t.checkpoint_dir is not None
    if checkpointing and under_torchrun and not (args.out or args.resume or t.checkpoint_dir):
        raise ConfigError("checkpoints under torchrun need --out: every rank, and a restarted group, "
                          "must find the same run directory (the default name has the time in it)")
    # Train into a scratch directory; the run directory appears (or is replaced) only on success.
    scratch = unfinished.scratch_for(out, checkpointing=checkpointing, resume=bool(args.resume),
                                     overwrite=args.overwrite, restarted=restart_count() > 0, rank0=rank0)
    if checkpointing and rank0:  # written first: `--resume` reads it back
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / unfinished.CONFIG_FILE).write_text(cfg.to_toml())

    data = prepare(cfg.data.dataset, seed=t.seed, val_fraction=cfg.data.val_fraction, loss=t.loss)

    def model():  # a factory: fit() builds it under the run's seed, so runs repeat
        return mlp(data.features, list(cfg.model.hidden), data.outputs, activation=cfg.model.activation,
                   dropout=cfg.model.dropout, batchnorm=cfg.model.batchnorm)

    succeeded = False
    try:
        result = fit(model, data, strategy=t.strategy, workers=t.workers, backend=t.backend,
                     partition=t.partition, epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer,
                     lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, loss=t.loss, seed=t.seed,
                     timeout=t.timeout, progress=not args.quiet,
                     checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints, nan=t.nan,
                     checkpoint_dir=t.checkpoint_dir or (scratch / "checkpoints" if checkpointing else None),
                     resume=bool(args.resume), log_dir=scratch)  # fit() writes it on rank 0 only
        if rank0:
            (scratch / "config.toml").write_text(cfg.to_toml())
            (scratch / "summary.txt").write_text(result.summary() + "\n")
            _replace_dir(scratch, out)
        succeeded = True
    except WorkerError as exc:
        if exc.checkpoint:
            exc.args = (str(exc).replace(RESUME_HINT, f"`unison train --resume {out}` continues from it"),)
        raise
    finally:
        # Rank 0's directory; an unfinished run with checkpoints is kept for --resume.
        if rank0 and not (checkpointing and not succeeded):
            shutil.rmtree(scratch, ignore_errors=True)
    if rank0:
        print(result.summary())
        print(f"run directory: {out}")
    return 0


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is removed only once ``new`` is in place."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _demo(args: argparse.Namespace) -> int:
    """XOR on 4 workers with per-epoch averaging of shards: the seed's prototype, learning."""
    import torch

    from .api import fit
    from .data import prepare
    from .models import mlp
    from .strategies import Periodic

    data = prepare("xor")
    result = fit(lambda: mlp(data.features, [16], data.outputs, activation="tanh"), data,
                 strategy=Periodic(every="epoch"), workers=4, backend=args.backend, partition="shard",
                 epochs=30, batch_size=8, lr=0.1, momentum=0.9, seed=0, progress=False)
    print(result.summary())
    print("the four corners of the truth table:")
    corners = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        predicted = result.model(data.transform(corners)).argmax(dim=1).tolist()
    for (a, b), p in zip(corners.int().tolist(), predicted):
        print(f"  {a} xor {b} -> {p}  ({'right' if p == (a ^ b) else 'WRONG'})")
    return 0
