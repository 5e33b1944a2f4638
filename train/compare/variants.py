"""The variants of a comparison: overrides over the base config, each run per seed, and the digests that
say which runs can be shared (a stage 1 serves every variant with the same stage-1 keys; a trained run
serves every variant that differs in evaluation settings only).

Which keys are which comes from their phase in :mod:`train.config.schema`: :data:`train.config.AFTER_STAGE1`
and :data:`train.config.EVALUATION_ONLY`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from ..config import (AFTER_STAGE1, DEFAULTS, EVALUATION_ONLY, RESUME_MAY_CHANGE, ConfigError, flatten, load_yaml,
                      merge, validate)

# What a comparison sets itself: the seed, and the keys that may change on resume (run.*), as prefixes.
FIXED = ("seed",) + tuple(sorted({key.rsplit(".", 1)[0] + "." for key in RESUME_MAY_CHANGE}))


def parse_variants(tree) -> dict[str, dict]:
    """``{name: {dotted key: value}}`` from a mapping of names to (nested or dotted) overrides."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"variants: expected a mapping 'name: {{key: value, ...}}', got "
                          f"{type(tree).__name__}")
    out = {}
    for name, over in tree.items():
        name = str(name)
        if not name or "/" in name or name.startswith((".", "stage1")):
            raise ConfigError(f"variant name {name!r}: expected a plain folder name not starting with "
                              f"'stage1'")
        if over is None:
            over = {}
        if not isinstance(over, dict):
            raise ConfigError(f"variant '{name}': expected a mapping of config keys, got {over!r}")
        flat = flatten(over)
        for key in flat:
            if key.startswith(FIXED):
                raise ConfigError(f"variant '{name}': key '{key}' is set by the comparison (seeds with "
                                  f"--seeds, run.* on the command line)")
        out[name] = flat
    return out


def variant_config(base: dict, overrides: dict, seed: int) -> dict:
    """The base config with a variant's overrides and the seed, validated."""
    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    tree: dict = {}
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    merge(cfg, tree, "variant")
    return validate(cfg)


def stage1_config(base: dict, overrides: dict, seed: int) -> dict:
    """The config of a stage-1 run: the variant's, with ``cc.*`` at its defaults and no rounds (stage 1
    reads none of them), so that comparisons with other exemplar settings can share the run."""
    cfg = variant_config(base, overrides, seed)
    cfg["cc"] = {**copy.deepcopy(DEFAULTS["cc"]), "rounds": 0}
    quiet(cfg)
    return validate(cfg)


def quiet(cfg: dict) -> None:
    """A comparison's inner runs: no per-run bars or TensorBoard (the comparison reports progress itself)."""
    cfg["run"]["progress"] = False
    cfg["run"]["tensorboard"] = False


def _digest(cfg: dict, ignore: tuple) -> str:
    import hashlib
    kept = {k: v for k, v in flatten(cfg).items() if k not in ignore}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def stage1_id(cfg: dict) -> str:
    """A digest of everything in ``cfg`` that stage 1 depends on: the keys of phase "stage 1"
    (:mod:`train.config.schema`)."""
    return _digest(cfg, AFTER_STAGE1)


def training_id(cfg: dict) -> str:
    """A digest of everything in ``cfg`` that training depends on: all but the keys of phase "evaluation
    only", "label" and "may change on resume" (:mod:`train.config.schema`)."""
    return _digest(cfg, EVALUATION_ONLY)


def load_variants(path: str | None, inline: list[str]) -> dict[str, dict]:
    """Variants from a YAML file (``name: {key: value}``) and ``--variant 'name: {key: value}'``."""
    tree = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"variants file not found: {path}")
        try:
            tree.update(load_yaml(p.read_text()) or {})
        except yaml.YAMLError as exc:
            raise ConfigError(f"variants file {path}: invalid YAML ({exc})") from None
    for text in inline:
        try:
            item = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--variant {text!r}: invalid YAML ({exc})") from None
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"--variant {text!r}: expected 'name: {{key: value, ...}}'")
        tree.update(item)
    return parse_variants(tree)
