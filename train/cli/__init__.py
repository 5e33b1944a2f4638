"""The command line, ``python -m train`` (``ccluster-train`` once installed).

* :mod:`.entry`: the parser, and the one-line handling of every error a user can cause;
* :mod:`.commands`: one function per command (fit, eval, demo, compare, steptime, config).
"""
from .entry import build_parser, main, parse

__all__ = ["main", "parse", "build_parser"]
