"""One run, the procedure's units and the files it writes.

* :mod:`.procedure`: :class:`Run`, a run folder and the staged procedure (every command opens runs
  through it);
* :mod:`.context`: what every unit shares (config, dataset, model, device, objective);
* :mod:`.steps`: batches, loss terms, optimisation steps;
* :mod:`.exemplars`: the exemplar database, alpha and Q per stream;
* :mod:`.evaluation`: predictions and metrics on the test subset;
* :mod:`.guards`: the checks that make a collapsing exemplar stage loud;
* :mod:`.folder`, :mod:`.lock`, :mod:`.checkpoint`, :mod:`.curves`: the run folder's files.

``Run``, ``RunFolder`` and ``stage_plan`` are imported on first use, so that ``python -m
train.run.checkpoint`` runs its module without importing it twice.
"""
__all__ = ["Run", "RunFolder", "stage_plan"]


def __getattr__(name):
    if name in ("Run", "stage_plan"):
        from . import procedure
        return getattr(procedure, name)
    if name == "RunFolder":
        from .folder import RunFolder
        return RunFolder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
