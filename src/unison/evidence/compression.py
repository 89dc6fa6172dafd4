"""Experiment 8, compression: whether compressing the gradients pays depends on the link
(Agarwal et al. 2022; Vogels et al. 2019), timed on modelled links (unison.linkmodel)."""

from __future__ import annotations

import math

from .. import linkmodel
from ..config import ModelConfig
from .base import Context, Experiment, Finding, first_reaching, per_seed

COMPRESSORS = {"fp16": "fp16", "int8": "int8", "powersgd(4)": "powersgd(4)"}
LINKS = {"slow": "100mbit,1ms", "fast": "10gbit,10us"}
WORKERS, HIDDEN, TARGET = 4, (256, 256), 0.90
REPEAT = 3  # the verdict rests on measured compute: each seed's time is the median of 3 attempts


def _time_to_target(link: str):
    """Seconds to TARGET with every round re-timed on ``link``; inf if never reached (slower
    than any time that reached it: a compressor that misses cannot pay)."""
    parsed = linkmodel.parse(link)

    def of(records) -> float:
        retimed = linkmodel.retimed(records, WORKERS, parsed)
        seconds = math.nan if retimed is None else first_reaching(TARGET, at="wall_s")(retimed)
        return math.inf if math.isnan(seconds) and retimed is not None else seconds
    return of


def relative(a: float, b: float) -> float:
    """a / b − 1: how much longer a took than b (inf: only b reached the target; nan: neither)."""
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b)) or b <= 0:
        return math.nan
    return a / b - 1.0


def measure(context: Context) -> list[Finding]:
    runs = {"none": "sync"} | {label: f"sync(compress={spec})" for label, spec in COMPRESSORS.items()}
    loaded = context.compare("links", runs, model=ModelConfig(hidden=HIDDEN), workers=WORKERS,
                             epochs=4 if context.quick else 6, batch_size=16, lr=0.05, momentum=0.9,
                             target=TARGET, link=LINKS["slow"], repeat=REPEAT)
    findings = []
    for name, link in LINKS.items():
        times = {label: per_seed(loaded, label, _time_to_target(link)) for label in runs}
        for compressor in COMPRESSORS:
            pays = name == "slow"  # the published direction: it pays on the slow link, not on the fast one
            findings.append(Finding(
                claim=f"on a {name} link ({link}) {compressor} {'pays' if pays else 'does not pay'}: it reaches "
                      f"{TARGET:.0%} {'sooner' if pays else 'no sooner'} than no compression",
                metric=f"modelled s to {TARGET:.0%} val acc on {link}", arms={"none": times["none"],
                                                                              compressor: times[compressor]},
                effect="time without / with compression − 1" if pays else "time with / without compression − 1",
                effects=[relative(n, c) if pays else relative(c, n) for n, c in zip(times["none"], times[compressor])],
                effect_unit="%"))
    return findings


EXPERIMENT = Experiment(
    name="compression",
    timed=True,
    paper="Agarwal et al. 2022, On the Utility of Gradient Compression in Distributed Training Systems "
          "(and, against it, Vogels et al. 2019, PowerSGD)",
    claim="Compressing the exchanged gradients pays only where the link is the bottleneck: on a fast data-centre "
          "link the compute it adds outweighs the bytes it saves, on a slow link it reaches a good model sooner.",
    paper_figure="From the abstracts: \"only in 6 cases out of more than 200, gradient compression methods provide "
                 "speedup over optimized synchronous data-parallel training in the typical data-center setting\" "
                 "(Agarwal et al., MLSys 2022). The claim is contested: PowerSGD \"is the only method evaluated "
                 "that achieves consistent wall-clock speedups when benchmarked against regular SGD with an "
                 "optimized communication backend\" (Vogels et al., NeurIPS 2019) — on their cluster, against "
                 "the fast-link half of this claim.",
    setup=f"Digits, an MLP with two hidden layers of {HIDDEN[0]} (83 k parameters, 332 KB of gradients a step), "
          f"{WORKERS} workers of `sync` on the stacked backend, SGD (lr 0.05, momentum 0.9, batch 16 per worker), "
          f"without compression and with {', '.join(COMPRESSORS)} (error feedback for int8 and PowerSGD). Each "
          "seed's rounds are re-timed on each link by unison's link model: the measured compute of a replica "
          "(compression included) plus its counted collectives on the link (ring all-reduce; "
          f"unison.linkmodel). Time to {TARGET:.0%} validation accuracy, read at the epoch ends; each seed "
          f"measured {REPEAT} times, interleaved, and its median taken.",
    quick_note="4 epochs instead of 6.",
    caveat="The papers' steps are long (convolutional networks and LSTMs on GPUs) and DDP overlaps their "
           "all-reduce with the backward pass, which the link model does not credit; a replica of this MLP "
           "computes a step in a fraction of a millisecond, so even a 10 Gbit/s link carries a large share of "
           "the step and a cheap compressor (fp16) can still pay there. The links are modelled, not measured: "
           "the model was checked against a real veth link limited with "
           "tc (bench/link.py; README, 'Compression over a real link'), within about 25% on most strategies. "
           "The compute is a 2-core CPU's, where a compressor's encoding costs more relative to the step than on "
           "a GPU; and time to accuracy is read at epoch ends, so a compressor that needs one more epoch to reach "
           "the target loses a whole epoch.",
    measure=measure,
)
