"""`unison train|compare|report|reproduce|demo`: a thin layer that maps TOML run files and flags onto
fit() and compare().

Every unison error, and any filesystem error, becomes one line on stderr and exit status 2,
never a traceback; warnings raised by a command that fails are not printed before that line.

Parsing the arguments imports no torch: ``unison --help`` and ``--version`` answer at once, and
each command imports what it runs (unison's modules, and with them torch) in its handler.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, UnisonError  # errors imports nothing else
from .verdict import SPREAD_RULE  # nor does verdict: the standard library only


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, like every other unison error
        self.exit(2, f"unison: error: {message} (see `{self.prog} --help`)\n")


_BACKENDS = "<the backends compare can run>"  # filled in when the help is shown


class _Formatter(argparse.HelpFormatter):
    """Fills in the backends' names only when a help text is shown, so that building the parser
    imports nothing heavy (they come from unison.launch, which imports torch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and _BACKENDS in action.help:
            return action.help.replace(_BACKENDS, _in_process_backends())
        return action.help


class _Version(argparse.Action):
    """--version: looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"unison {version()}")  # on stdout, as argparse's own version action does
        parser.exit(0)


def version() -> str:
    """The installed distribution's version, else the package's own ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("unison")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _in_process_backends() -> str:
    from . import launch

    return ", ".join(name for name, b in launch.REGISTRY.items() if b.in_process)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unison", description="Train replicas of a network in parallel and merge them.")
    parser.add_argument("--version", action=_Version, help="print unison's version and exit")
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
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved run file (every default filled in, --set applied) as TOML "
                            "and exit without training")

    compare = commands.add_parser(
        "compare", help="train with several strategies and report which reaches a good model fastest",
        description="With no arguments: digits, an MLP, 2 workers on processes, the default strategies "
                    "and every other registered one (but fedbuff: name it in --strategies).")
    compare.add_argument("run_file", nargs="?", help="TOML with [data], [model], [train] and [compare] "
                         "tables (default: the embedded digits comparison)")
    compare.add_argument("--strategies", help="comma-separated, e.g. 'single,sync,periodic(every=8)'")
    compare.add_argument("--dataset", help="a built-in name, 'synthetic(samples=..)' or a .csv/.npz/.pt file")
    compare.add_argument("--workers", type=int, help="workers per run (single always uses one)")
    compare.add_argument("--backend", help=_BACKENDS)
    compare.add_argument("--epochs", type=int, help="epochs per run")
    compare.add_argument("--target", type=float, help="validation accuracy to time (default: 98%% of "
                         "single's best)")
    compare.add_argument("--repeat", type=_integer, metavar="N", help="measure each run N times, in "
                         f"interleaved order (default 5); times are medians with their spread ({SPREAD_RULE})")
    compare.add_argument("--seeds", type=_integer, metavar="K", help="train each run with K seeds (default 1); "
                         "final accuracy as mean ± a 95%% interval")
    compare.add_argument("--threads", type=_integer, metavar="T", help="intra-op threads of one-worker runs "
                         "(default: 1 or every core, whichever a short calibration finds faster)")
    compare.add_argument("--link", metavar="RATE[,LATENCY]", help="also predict each run's time to target and "
                         "per epoch on this network link, e.g. 100mbit,20ms (rates kbit/mbit/gbit, latency "
                         "ms/us/s): measured compute + modelled collectives; the winner on the link is named "
                         "from the modelled times")
    compare.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                         help="override a setting, e.g. --set train.lr=0.1 (repeatable)")
    compare.add_argument("--out", help="output directory (default runs/<date-time>-compare)")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    compare.add_argument("--quiet", action="store_true", help="no progress output")
    compare.add_argument("--tensorboard", action="store_true",
                         help="also write TensorBoard scalars (needs the tensorboard extra)")

    report = commands.add_parser("report", help="rebuild a comparison's summary, plots and report.html")
    report.add_argument("run_dir", help="a directory written by `unison compare`")

    reproduce = commands.add_parser(
        "reproduce", help="check a published finding about parallel training on this machine, with a verdict",
        description="Runs one experiment (or all) over several seeds and judges its findings: reproduced when "
                    "the published direction holds in at least 80% of the seeds (4 of 5, 3 of 3), not reproduced "
                    "when it fails in as many, else inconclusive. Writes OUT/NAME (the comparisons, each with its report) and "
                    "rewrites the document of every experiment in OUT.")
    reproduce.add_argument("name", nargs="?", help="an experiment (see --list), or 'all'")
    reproduce.add_argument("--list", action="store_true", help="name each experiment with its paper and exit")
    reproduce.add_argument("--quick", action="store_true", help="3 seeds and smaller runs (minutes, not tens)")
    reproduce.add_argument("--seeds", type=_integer, metavar="K", help="seeds per run (default 5, --quick 3; "
                           "at least 3); a direction must hold in 80%% of them")
    reproduce.add_argument("--out", help="results folder (default runs/evidence); OUT/NAME is replaced "
                           "only with --overwrite")
    reproduce.add_argument("--doc", metavar="FILE", help="where to write the document (default OUT/evidence.md)")
    reproduce.add_argument("--doc-only", action="store_true", help="only rewrite the document from the results "
                           "already in OUT (no training)")
    reproduce.add_argument("--overwrite", action="store_true", help="replace an experiment's earlier results")
    reproduce.add_argument("--quiet", action="store_true", help="no progress output")

    demo = commands.add_parser("demo", help="the seed's sample run")
    demo.add_argument("name", choices=["xor"], help="which demo")
    demo.add_argument("--backend", default="threads", choices=("threads", "processes"))
    return parser


def _integer(text: str) -> int | str:
    """An integer flag; anything else is passed on as given, for compare's own check to refuse
    with the field's name and accepted values."""
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"train": _train, "compare": _compare, "report": _report, "reproduce": _reproduce,
               "demo": _demo}[args.command]
    # Warnings wait for the command's end: printed if it succeeds, dropped if it fails (its
    # error is then the one line on stderr).
    with warnings.catch_warnings(record=True) as caught:
        try:
            status = command(args)
        except UnisonError as exc:
            return _error(str(exc))
        except OSError as exc:  # a full disk, a folder that vanished, ...: the path and the reason
            return _error(_os_error(exc))
        except KeyboardInterrupt:
            print("unison: interrupted", file=sys.stderr)
            return 130
    for warning in caught:  # one line each, like the errors
        print(f"unison: warning: {' '.join(str(warning.message).split())}", file=sys.stderr)
    return status


def _error(message: str) -> int:
    print(f"unison: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
    return 2


def _os_error(exc: OSError) -> str:
    paths = " -> ".join(repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or str(exc)
    return f"{paths}: {reason}" if paths else reason


def _run_file(path: str) -> str:
    """A run file's path, refused if it is a folder (reading it would be an IsADirectoryError)."""
    if Path(path).is_dir():
        raise ConfigError(f"run file {path!r} is a directory; expected a TOML file")
    return path


def _train(args: argparse.Namespace) -> int:
    from . import config as run_config
    from . import launch, rundir
    from .api import train

    if (args.run_file is None) == (args.resume is None):
        raise ConfigError("train needs a run file, or --resume RUN_DIR to continue an unfinished run (not both)")
    if args.resume and args.out:
        raise ConfigError("--resume RUN_DIR continues into RUN_DIR; leave out --out")
    out = rundir.run_dir_of(args.resume) if args.resume else args.out
    cfg = run_config.load(rundir.resume_config(out) if args.resume else _run_file(args.run_file), args.sets)
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    result, out = train(cfg, out=out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet)
    if launch.get(result.config.backend).is_writer():  # under torchrun the run's backend became torchrun
        print(result.summary())
        print(f"run directory: {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    if not args.quiet:  # a line at once: importing torch and preparing the data take seconds
        print("unison compare: starting (torch, the data, a warm-up), then a line per run", flush=True)
    import tomllib
    from dataclasses import fields

    from . import config as run_config
    from .comparison import DEFAULTS, compare, load_settings, runs_from_options
    from .report import REPORT_HTML
    from .summary import TARGET_FRACTION

    raw: dict = DEFAULTS
    if args.run_file:
        try:
            raw = tomllib.loads(Path(_run_file(args.run_file)).read_text())
        except FileNotFoundError:
            raise ConfigError(f"run file {args.run_file!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"run file {args.run_file!r} is not valid TOML: {exc}") from None
        raw = run_config.resolve_paths(raw, Path(args.run_file).parent)  # a model file beside the run file
    flags = {"data.dataset": args.dataset, "train.workers": args.workers, "train.backend": args.backend,
             "train.epochs": args.epochs}
    overrides = run_config.parse_sets(args.sets) | {k: v for k, v in flags.items() if v is not None}
    cfg, options = load_settings(raw, overrides)
    strategies = args.strategies if args.strategies is not None else runs_from_options(options)
    target = args.target if args.target is not None else options.get("target")
    measuring = {name: value for name in ("repeat", "seeds", "threads", "link")
                 if (value := getattr(args, name) if getattr(args, name) is not None else options.get(name)) is not None}
    # Every [train] setting but the strategy applies to every run (compare forwards them to fit).
    train = {f.name: getattr(cfg.train, f.name) for f in fields(cfg.train) if f.name != "strategy"}
    # compare() sizes a ModelConfig as an MLP; a class_path model goes as its factory
    model = cfg.model if cfg.model.class_path is None else cfg.model.factory()
    result = compare(model, cfg.data.dataset, cfg.data.val_fraction, label=cfg.data.label,
                     strategies=strategies, target=target,
                     target_fraction=options.get("target_fraction", TARGET_FRACTION), out=args.out,
                     overwrite=args.overwrite, progress=not args.quiet, tensorboard=args.tensorboard,
                     **measuring, **train)
    print(result.table(), end="")
    print(f"report: {result.out / REPORT_HTML}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from . import report
    from .summary import markdown

    summary = report.build(args.run_dir)
    print(markdown(summary), end="")
    print(f"report: {Path(args.run_dir) / report.REPORT_HTML}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from . import evidence

    if args.list:
        if args.name is not None or args.quick or args.seeds is not None:
            raise ConfigError("reproduce --list takes no experiment name, --quick or --seeds")
        for spec in evidence.experiments():
            print(f"{spec.name:<12} {spec.paper}")
        return 0
    if args.doc_only:
        if args.name is not None or args.quick or args.seeds is not None:
            raise ConfigError("reproduce --doc-only takes no experiment name, --quick or --seeds")
        print(f"evidence: {evidence.rewrite_document(out=args.out, doc=args.doc)}")
        return 0
    if args.name is None:
        raise ConfigError(f"reproduce needs an experiment: one of {', '.join(evidence.NAMES)}, or all "
                          "(--list names each with its paper)")
    names = evidence.NAMES if args.name == "all" else (args.name,)
    _, _, doc = evidence.check(names, quick=args.quick, seeds=args.seeds, out=args.out, overwrite=args.overwrite,
                               doc=args.doc)
    for name in names:
        found = evidence.reproduce(name, quick=args.quick, seeds=args.seeds, out=args.out, doc=args.doc,
                                   overwrite=args.overwrite, progress=not args.quiet)
        print(found.summary())
    print(f"evidence: {doc}")
    return 0


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
