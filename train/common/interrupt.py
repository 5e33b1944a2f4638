"""Ctrl-C stops a command every time.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the interpreter happens to be. When
that is inside a weak-reference callback or a ``__del__`` (tqdm, torch and the garbage collector run
them at any moment), Python prints ``Exception ignored in: ...`` and drops the exception: the command
goes on as if nothing was pressed. Under :func:`stop_on_ctrl_c` (the command line installs it) the
handler also records the request, :func:`check` raises ``KeyboardInterrupt`` again at the next safe
point (every training step, every video of a collection or an evaluation, every run of a comparison),
and a dropped ``KeyboardInterrupt`` is not printed.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

_requested = False


def _on_sigint(signum, frame):
    global _requested
    _requested = True
    raise KeyboardInterrupt


def _unraisable(default):
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested:
            return  # dropped where it was raised; check() raises it again
        default(unraisable)
    return hook


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Within: Ctrl-C raises ``KeyboardInterrupt`` and is remembered until :func:`check` sees it (main
    thread only; elsewhere nothing changes)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, previous_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    _requested = False
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _requested = False


def requested() -> bool:
    """Whether Ctrl-C was pressed under :func:`stop_on_ctrl_c`."""
    return _requested


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed (its first ``KeyboardInterrupt`` may have been
    dropped); a no-op otherwise. Call it at points where stopping is safe."""
    if _requested:
        raise KeyboardInterrupt
