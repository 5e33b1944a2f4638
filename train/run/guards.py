"""Checks that make a collapsing exemplar stage loud instead of silent.

Each check returns ``[(guard, message)]``; the trainer prints every message as a warning and records it
in ``metrics.jsonl`` as ``{"kind": "warning", "guard": ..., "message": ...}``. The thresholds are config
keys (``cc.guard_*``). What each one catches:

* ``alpha_jump``: an automatic alpha that changes by more than ``cc.guard_alpha_jump`` between two
  collections. alpha follows the inverse within-class exemplar distance, so a jump means the embedding
  contracted (or blew up) during the last exemplar stage.
* ``q_uniform``: Q close to uniform (perplexity over filled slots above ``cc.guard_q_uniform`` for the
  median class): the kernel no longer tells exemplars apart, usually because alpha * d is ~0 everywhere.
* ``fit_unconverged``: the Q fit stopped at ``cc.fit_max_iter`` with a class's certificate (the gap, in
  nats: how far the class's objective may be below its optimum) above ``cc.guard_fit_gap``. A smaller gap
  is harmless, so only a larger one is worth a warning (:func:`fit_gap_threshold`; the database line
  reports every fit's passes and gap either way).
* ``phi_shrink``: phi's mean norm fell by more than ``cc.guard_phi_shrink``, between collections or during
  a training stage against the value at the last collection.
"""
from __future__ import annotations

import math

from ..objectives import objective_class


def fit_gap_threshold(cfg: dict) -> float:
    """The gap (nats) above which an unconverged Q fit is reported: ``cc.guard_fit_gap``, or for
    ``"auto"`` the value measured for the objective (:attr:`train.objectives.ExemplarObjective.auto_fit_gap`:
    with "prior", which standardises log z per video, gaps up to 0.17 nats moved the final mAPs by less
    than 0.1 points; with "contrastive", which uses log z as it is, 0.021 moved them by 0.17 and 0.07 by
    0.6 points, the seeds' spread being 0.5-1.1; "literal" uses log z as it is too)."""
    c = cfg["cc"]
    if c["guard_fit_gap"] != "auto":
        return float(c["guard_fit_gap"])
    return objective_class(cfg).auto_fit_gap


def collection_warnings(info: dict, previous: dict | None, cfg: dict) -> list[tuple[str, str]]:
    """Warnings about one collection's summary ``info`` (:meth:`train.run.exemplars.ExemplarState.build`),
    given the previous collection's summary (None at the first)."""
    c = cfg["cc"]
    out = []
    for s in [k[len("alpha_"):] for k in info if k.startswith("alpha_")]:
        a = info.get(f"alpha_{s}")
        if previous is not None and c["alpha"] == "auto":
            before = previous.get(f"alpha_{s}")
            if a and before and max(a / before, before / a) > c["guard_alpha_jump"]:
                out.append(("alpha_jump", f"{s}: the automatic alpha changed {a / before:.3g}x since the last "
                                          f"collection ({before:.4g} -> {a:.4g}); the embedding's scale changed "
                                          f"during the exemplar stage (cc.guard_alpha_jump = "
                                          f"{c['guard_alpha_jump']:g})"))
        u = info.get(f"q_uniformity_{s}", math.nan)
        if math.isfinite(u) and u > c["guard_q_uniform"]:
            out.append(("q_uniform", f"{s}: Q is near uniform (perplexity {100 * u:.0f} % of the filled slots, "
                                     f"median class); alpha {a:.4g} may be too small for these distances "
                                     f"(cc.guard_q_uniform = {c['guard_q_uniform']:g})"))
        n = info.get(f"fit_unconverged_{s}", 0)
        gap = info.get(f"fit_gap_{s}", math.nan)
        if n and not gap <= fit_gap_threshold(cfg):
            out.append(("fit_unconverged", f"{s}: the Q fit stopped at cc.fit_max_iter = {c['fit_max_iter']} with "
                                           f"a certificate gap of {gap:.3g} nats, above cc.guard_fit_gap = "
                                           f"{fit_gap_threshold(cfg):g} ({n} class(es) above cc.fit_tol = "
                                           f"{c['fit_tol']:g}): Q is that far from its optimum; raise "
                                           f"cc.fit_max_iter (e.g. to {4 * c['fit_max_iter']}) so that it "
                                           f"converges"))
        if previous is not None:
            out += phi_shrink_warnings({s: info.get(f"phi_norm_{s}")},
                                       {s: previous.get(f"phi_norm_{s}")}, cfg, "since the last collection")
    return out


def phi_shrink_warnings(norms: dict, reference: dict, cfg: dict, when: str) -> list[tuple[str, str]]:
    """``phi_shrink`` warnings for the streams whose norm in ``norms`` fell below ``reference`` by more
    than ``cc.guard_phi_shrink``."""
    factor = cfg["cc"]["guard_phi_shrink"]
    out = []
    for s, now in norms.items():
        ref = reference.get(s)
        if now is None or not ref or not math.isfinite(now):
            continue
        if now * factor < ref:
            out.append(("phi_shrink", f"{s}: phi's mean norm fell {ref / max(now, 1e-300):.3g}x {when} "
                                      f"({ref:.4g} -> {now:.4g}); the exemplar loss is contracting the "
                                      f"embedding (cc.normalize: true prevents it; cc.guard_phi_shrink = "
                                      f"{factor:g})"))
    return out
