"""``unison reproduce``: published findings about parallel training, checked in direction on
this machine, one command each, with a verdict (unison.evidence.judge) and a document.

Each experiment is a module here with an ``EXPERIMENT`` (unison.evidence.base.Experiment);
NAMES lists them in the order the document gives them.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__, measure, rundir
from ..errors import ConfigError, expected
from ..launch import cpu_cores
from ..validators import check_int
from . import document
from .base import DEFAULT_SEEDS, QUICK_SEEDS, Context, Experiment, Finding
from .judge import Verdict, judge

NAMES = ("fedavg", "postlocal", "localsgd", "diloco", "soups", "hogwild", "drift", "compression")
DEFAULT_OUT = document.DEFAULT_OUT
RESULT_FILE = "finding.json"
RESULT_FORMAT = 1  # finding.json's layout; a document skips results of another
MIN_SEEDS = 3
TEXT_FIELDS = ("paper", "claim", "paper_figure", "setup", "caveat", "quick_note")


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
    loaded: str | None = None   # why a timed experiment's verdicts may not hold (a loaded machine)

    def summary(self) -> str:
        """A line per finding: its claim, verdict and effect (what `unison reproduce` prints)."""
        lines = []
        for verdict, finding in zip(self.verdicts, self.findings):
            effect = document.mean_text(finding.effects, unit=finding.effect_unit)
            lines.append(f"{self.experiment.name}: {finding.claim}: {verdict.text()}; {finding.effect}: {effect}")
        return "\n".join(lines + ([f"{self.experiment.name}: warning: {self.loaded}"] if self.loaded else []))


def reproduce(name: str, *, quick: bool = False, seeds: int | None = None, seed: int = 0,
              out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
              doc: str | Path | None = None) -> Evidence:
    """Run experiment ``name`` with ``seeds`` seeds (default 5, 3 with ``quick``) into
    ``out/name`` (default runs/evidence), judge each finding and rewrite the document
    (``doc``, default ``out/evidence.md``) from every experiment found in ``out``."""
    spec = experiment(name)
    seeds, out, doc = check([name], quick=quick, seeds=seeds, seed=seed, out=out, overwrite=overwrite, doc=doc)
    target = out / name
    scratch = rundir.scratch_for(target)
    started, load_before = time.monotonic(), measure.machine_load()
    if progress:
        print(f"unison reproduce {name}{' --quick' if quick else ''}: {spec.paper}; {seeds} seeds", file=sys.stderr,
              flush=True)
    try:
        scratch.mkdir(parents=True)
        context = Context(seeds=list(range(seed, seed + seeds)), quick=quick, out=scratch, progress=progress)
        findings = spec.measure(context)
        verdicts = [judge(f.effects, f.threshold) for f in findings]
        loads = [v for v in (load_before, measure.machine_load()) if v is not None]
        loaded = (f"the machine's load average reached {max(loads):g} on {cpu_cores()} cores while it ran; these "
                  "verdicts rest on measured time and may not hold on an idle machine"
                  if spec.timed and loads and max(loads) > cpu_cores() else None)
        result = {"format": RESULT_FORMAT, "unison": __version__, "name": name, "quick": quick,
                  "seeds": context.seeds, "default_seeds": QUICK_SEEDS if quick else DEFAULT_SEEDS,
                  "parts": context.parts, "elapsed_s": round(time.monotonic() - started, 1), "cores": cpu_cores(),
                  "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
                  "date": time.strftime("%Y-%m-%d"), "text": {k: getattr(spec, k) for k in TEXT_FIELDS},
                  "out": str(out), "loaded": loaded, "notes": context.notes,
                  "findings": [asdict(f) for f in findings], "verdicts": [asdict(v) for v in verdicts]}
        (scratch / RESULT_FILE).write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False))
        document.plot(findings, verdicts, scratch / document.PLOT)
        rundir.replace_dir(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_document(out, doc)
    return Evidence(spec, findings, verdicts, target, loaded)


def check(names: list[str] | tuple[str, ...], *, quick: bool = False, seeds: int | None = None, seed: int = 0,
          out: str | Path | None = None, overwrite: bool = False,
          doc: str | Path | None = None) -> tuple[int, Path, Path]:
    """ConfigError, before anything trains, for an unknown experiment, too few seeds, an
    experiment folder in ``out`` that exists (without ``overwrite``) or a document path that
    cannot be written or holds something else; the seeds, out and document to use."""
    for name in names:
        experiment(name)
    seeds = (QUICK_SEEDS if quick else DEFAULT_SEEDS) if seeds is None else seeds
    check_int("seeds", seeds, minimum=MIN_SEEDS, maximum=100)
    check_int("seed", seed, minimum=0)
    out = Path(out) if out is not None else DEFAULT_OUT
    for name in names:
        rundir.check_free(out / name, overwrite)
    doc = Path(doc) if doc is not None else out / document.DOCUMENT
    _check_document(doc)
    return seeds, out, doc


def _check_document(doc: Path) -> None:
    if doc.is_dir():
        raise ConfigError(f"doc {str(doc)!r} is a directory; expected a Markdown file to write")
    if doc.is_file() and not doc.read_text(errors="replace").startswith(document.HEADING):
        raise ConfigError(f"doc {str(doc)!r} exists and was not written by unison reproduce; choose another "
                          "--doc (it is never replaced)")
    parent = doc.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"doc {str(doc)!r} cannot be written: {str(parent)!r} is not a writable folder")


def _json_safe(value):
    """JSON without NaN or Infinity: non-finite numbers become null (the verdicts were judged
    before, and keep their counts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def rewrite_document(out: str | Path | None = None, doc: str | Path | None = None) -> Path:
    """The document rewritten from the results already in ``out`` (default runs/evidence), no
    training; ConfigError if there are none or ``doc`` holds something else."""
    out = Path(out) if out is not None else DEFAULT_OUT
    doc = Path(doc) if doc is not None else out / document.DOCUMENT
    if not any((out / name / RESULT_FILE).is_file() for name in NAMES):
        raise ConfigError(f"no results of unison reproduce in {str(out)!r} (expected {str(out)}/NAME/{RESULT_FILE})")
    _check_document(doc)
    return write_document(out, doc)


def write_document(out: Path, doc: Path) -> Path:
    """The document of every experiment with results in ``out``, in NAMES order; a result that
    cannot be read, or of another format, is left out with a warning. Written atomically."""
    results = []
    for name in NAMES:
        path = out / name / RESULT_FILE
        if not path.is_file():
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(f"{path} left out of the document: it cannot be read ({exc})", stacklevel=2)
            continue
        if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
            warnings.warn(f"{path} left out of the document: written by another version of unison reproduce; "
                          f"rerun `unison reproduce {name} --overwrite`", stacklevel=2)
            continue
        results.append(result)
    doc.parent.mkdir(parents=True, exist_ok=True)
    partial = doc.parent / f".{doc.name}.partial-{os.getpid()}"
    partial.write_text(document.markdown(results, out, doc.parent))
    os.replace(partial, doc)
    return doc
