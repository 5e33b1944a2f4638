"""The exemplar objectives (``cc.loss``), one file each, and their registry.

An objective supplies what the exemplar stages do with the database: the classes and weights of the
collection, the loss of a stream, how that loss is scaled, and the test-time selection
(:class:`~train.objectives.base.ExemplarObjective`). Adding one: a file with its class here, and one line
in :data:`OBJECTIVES` (``cc.loss`` then accepts its name; the config reference and the tests pick it up).

The registry names each objective's module and class, imported when a run uses it: the config reads
the names without importing torch, so that the command line starts (and Ctrl-C stops it) before torch
is loaded.
"""
from __future__ import annotations

import importlib

# cc.loss -> "module:class" of its objective in this package
OBJECTIVES: dict[str, str] = {
    "literal": "literal:Literal",
    "contrastive": "contrastive:Contrastive",
    "prior": "prior:Prior",
    "tcam_prior": "tcam_prior:TcamPrior",
}


def load_objective(name: str) -> type:
    """The class of the objective registered as ``name``."""
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def objective_class(cfg: dict) -> type:
    """The class of the objective that ``cc.loss`` names: the one place the key is read."""
    return load_objective(cfg["cc"]["loss"])


def build_objective(cfg: dict):
    """The objective of a validated config (an :class:`~train.objectives.base.ExemplarObjective`)."""
    return objective_class(cfg)(cfg["cc"])


__all__ = ["OBJECTIVES", "load_objective", "objective_class", "build_objective"]
