"""What every command line of the package shares: one-line errors and checked number arguments.

A parser error prints ``error: <what>, see <prog> --help`` on one line and exits with code 2, as every
other error a user can cause (see :mod:`train.cli`).
"""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what>, see <prog> --help`` and exit code 2."""

    def error(self, message):
        print(f"error: {message}, see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1, ">= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0, ">= 0")
