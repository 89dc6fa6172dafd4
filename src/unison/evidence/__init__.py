"""``unison reproduce``: published findings about parallel training, checked in direction on
this machine, one command each, with a verdict (unison.evidence.judge) and a document.

Each experiment is a module here with an ``EXPERIMENT`` (unison.evidence.base.Experiment);
NAMES lists them in the order the document gives them.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import rundir
from ..errors import ConfigError, expected
from ..launch import cpu_cores
from ..validators import check_int
from . import document
from .base import DEFAULT_SEEDS, QUICK_SEEDS, Context, Experiment, Finding
from .judge import Verdict, judge

NAMES = ("fedavg", "postlocal", "localsgd", "diloco", "soups", "hogwild", "drift", "compression")
DEFAULT_OUT = Path("runs") / "evidence"
RESULT_FILE = "finding.json"
MIN_SEEDS = 3


def experiment(name: str) -> Experiment:
    if name not in NAMES:
        raise ConfigError(expected("experiment", name, NAMES + ("all",)))
    return importlib.import_module(f"{__name__}.{name}").EXPERIMENT


def experiments() -> list[Experiment]:
    return [experiment(name) for name in NAMES]


@dataclass
class Evidence:
    """What reproduce() returns: the experiment, its findings and their verdicts, where written."""

    experiment: Experiment
    findings: list[Finding]
    verdicts: list[Verdict]
    out: Path

    @property
    def verdict(self) -> str:
        """The experiment's verdict: its first (headline) finding's."""
        return self.verdicts[0].verdict


def reproduce(name: str, *, quick: bool = False, seeds: int | None = None, seed: int = 0,
              out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
              doc: str | Path | None = None) -> Evidence:
    """Run experiment ``name`` with ``seeds`` seeds (default 5, 3 with ``quick``) into
    ``out/name`` (default runs/evidence), judge each finding and rewrite the document
    (``doc``, default ``out/evidence.md``) from every experiment found in ``out``."""
    spec = experiment(name)
    seeds, out = check([name], quick=quick, seeds=seeds, seed=seed, out=out, overwrite=overwrite)
    target = out / name
    doc = Path(doc) if doc is not None else out / document.DOCUMENT
    scratch = rundir.scratch_for(target)
    started = time.monotonic()
    if progress:
        print(f"unison reproduce {name}{' --quick' if quick else ''}: {spec.paper}; {seeds} seeds", file=sys.stderr,
              flush=True)
    try:
        scratch.mkdir(parents=True)
        context = Context(seeds=list(range(seed, seed + seeds)), quick=quick, out=scratch, progress=progress)
        findings = spec.measure(context)
        verdicts = [judge(f.effects, f.threshold) for f in findings]
        result = {"name": name, "quick": quick, "seeds": context.seeds, "parts": context.parts,
                  "elapsed_s": round(time.monotonic() - started, 1), "cores": cpu_cores(),
                  "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
                  "date": time.strftime("%Y-%m-%d"),
                  "findings": [asdict(f) for f in findings], "verdicts": [asdict(v) for v in verdicts]}
        (scratch / RESULT_FILE).write_text(json.dumps(result, indent=1, allow_nan=True))
        document.plot(findings, verdicts, scratch / document.PLOT)
        rundir.replace_dir(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_document(out, doc)
    return Evidence(spec, findings, verdicts, target)


def check(names: list[str] | tuple[str, ...], *, quick: bool = False, seeds: int | None = None, seed: int = 0,
          out: str | Path | None = None, overwrite: bool = False) -> tuple[int, Path]:
    """ConfigError, before anything trains, for an unknown experiment, too few seeds or an
    experiment folder in ``out`` that exists (without ``overwrite``); the seeds and out to use."""
    for name in names:
        experiment(name)
    seeds = (QUICK_SEEDS if quick else DEFAULT_SEEDS) if seeds is None else seeds
    check_int("seeds", seeds, minimum=MIN_SEEDS, maximum=100)
    check_int("seed", seed, minimum=0)
    out = Path(out) if out is not None else DEFAULT_OUT
    for name in names:
        rundir.check_free(out / name, overwrite)
    return seeds, out


def write_document(out: Path, doc: Path) -> Path:
    """The document of every experiment with results in ``out``, in NAMES order."""
    results = [(experiment(name), json.loads((out / name / RESULT_FILE).read_text()))
               for name in NAMES if (out / name / RESULT_FILE).is_file()]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(document.markdown(results, out, doc.parent))
    return doc
