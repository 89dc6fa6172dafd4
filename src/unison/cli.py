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
    train.add_argument("run_file", help="TOML with [data], [model] and [train] tables")
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
    from .api import fit
    from .data import prepare
    from .launch.torchrun import is_rank0
    from .launch.torchrun import world_size as torchrun_world_size
    from .models import mlp

    cfg = run_config.load(args.run_file, args.sets)
    under_torchrun = torchrun_world_size() is not None
    if under_torchrun and cfg.train.backend != "torchrun":
        # The same run file works alone and under torchrun: torchrun decides the workers.
        cfg = run_config.from_dict(cfg.to_dict(), {"train.backend": "torchrun",
                                                   "train.workers": torchrun_world_size()})
    rank0 = is_rank0()
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-train")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"run directory {str(out)!r} already exists; pass --overwrite to replace it "
                          "or choose another --out")

    t = cfg.train
    data = prepare(cfg.data.dataset, seed=t.seed, val_fraction=cfg.data.val_fraction, loss=t.loss,
                   label=cfg.data.label)

    def model():  # a factory: fit() builds it under the run's seed, so runs repeat
        return mlp(data.features, list(cfg.model.hidden), data.outputs, activation=cfg.model.activation,
                   dropout=cfg.model.dropout, batchnorm=cfg.model.batchnorm)

    # Train into a scratch directory; the run directory appears (or is replaced) only on success.
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        result = fit(model, data, strategy=t.strategy, workers=t.workers, backend=t.backend,
                     partition=t.partition, epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer,
                     lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, loss=t.loss, seed=t.seed,
                     timeout=t.timeout, progress=not args.quiet,
                     log_dir=scratch)  # fit() writes it on rank 0 only
        if rank0:
            (scratch / "config.toml").write_text(cfg.to_toml())
            (scratch / "summary.txt").write_text(result.summary() + "\n")
            _replace_dir(scratch, out)
    finally:
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
