"""``docs/config.md``, generated from the schema (:mod:`train.config.schema`) and the objectives' registry.

    python -m train.config.reference docs/config.md     # write it (without a path: print it)

A test fails when the file differs from what this writes, so a key added to the schema (or an objective
added to the registry) without regenerating the reference is caught.
"""
from __future__ import annotations

import sys

from .schema import KEYS, PHASES, SECTIONS, Key

PHASE_DOCS = {
    "stage 1": "stage 1 (the baseline) depends on it, and so does everything after it",
    "after stage 1": "only the exemplar rounds depend on it: `compare` variants that differ in nothing else share "
                     "one stage 1",
    "evaluation only": "only evaluation depends on it: `compare` re-evaluates a trained run instead of training "
                       "again",
    "label": "it names the run; no result depends on it",
    "may change on resume": "how the run executes; `fit --resume` accepts a new value",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def _value(value) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(f"{v:g}" for v in value) + "]`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _row(key: Key) -> str:
    return (f"| `{key.name}` | {key.kind} | {_value(key.default)} | {_cell(key.range)} | {key.phase} | "
            f"{_cell(key.doc)} |")


def reference_markdown() -> str:
    """The text of ``docs/config.md``."""
    from ..objectives import OBJECTIVES, load_objective
    out = ["# Config reference", "",
           "<!-- Generated from train/config/schema.py by `python -m train.config.reference docs/config.md`; "
           "do not edit by hand: a test checks that this file is up to date. -->", "",
           "Every key of a run's config, in the order of the tree. A run reads the defaults, then a YAML file "
           "(`--config`), then `key=value` overrides; see [training](training.md#configs) for how values are "
           "read and checked. Types: a whole number is accepted for a `float` key and a float that is whole for "
           "an `int` key.", "",
           "The phase says what a change of the key touches:", ""]
    out += [f"- **{phase}**: {PHASE_DOCS[phase]}" for phase in PHASES]
    for section, line in SECTIONS.items():
        keys = [k for k in KEYS if (k.name.split(".")[0] if "." in k.name else "") == section]
        out += ["", f"## {f'`{section}`' if section else 'Top level'}: {line}", "",
                "| key | type | default | allowed | phase | what it does |", "| --- | --- | --- | --- | --- | --- |"]
        out += [_row(k) for k in keys]
        if section == "cc":
            out += ["", "The exemplar objectives that `cc.loss` names (`train/objectives/`, one file each):", ""]
            out += [f"- `{name}` (`train/objectives/{cls.__module__.rsplit('.', 1)[-1]}.py`): "
                    f"{(cls.__doc__ or '').strip().splitlines()[0]}"
                    for name, cls in ((name, load_objective(name)) for name in OBJECTIVES)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    """Write the reference to the path given (or print it)."""
    argv = sys.argv[1:] if argv is None else argv
    text = reference_markdown()
    if argv:
        with open(argv[0], "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
