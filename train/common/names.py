"""How the package's commands are spelled where a message tells a user to run one.

In a checkout the training package is the folder ``train/`` and its commands are ``python -m train``
and ``python -m train.eval``; once installed (``pip install --no-build-isolation .``) it is the package
``ccluster_train``, with the console scripts ``ccluster-train`` and ``ccluster-eval`` (setup.py), which
work from any folder.
"""
from __future__ import annotations

PACKAGE = __name__.split(".")[0]
INSTALLED = PACKAGE != "train"
TRAIN = "ccluster-train" if INSTALLED else "python -m train"
EVAL = "ccluster-eval" if INSTALLED else "python -m train.eval"


def module(name: str) -> str:
    """``python -m <package>.<name>``: a module's command under the package's current name."""
    return f"python -m {PACKAGE}.{name}"
