"""Reading a config: the defaults of :mod:`train.config.schema`, overridden by a YAML file and then by
``key=value`` pairs, validated, saved.

    cfg = load_config("configs/synthetic.yaml", ["train.lr=3e-4", "cc.alpha=0.5"])
    cfg["cc"]["alpha"]          # plain nested dicts, nothing magic
    save_config(cfg, run_dir / "config.yaml")

Every key a YAML file or an override may set is declared in :mod:`train.config.schema`; an unknown key, a
value of the wrong type or out of range stops with a :class:`ConfigError` that names the key, what was
expected and what arrived.

Values are read as YAML (PyYAML's YAML 1.1 safe loader) with one addition: every float literal Python's
``float()`` accepts is a float (``1e-3``, ``1E-3``, ``-2.5e+3``, ``.5``, ``-.5``, ``5.``, ``1_000.5``,
``inf``, ``nan``), where YAML 1.1 alone would keep ``1e-3`` as a string. Non-finite numbers are then refused
by validation like ``.inf``. At a key whose value is a string (``name``, ``data.root``, ...), an unquoted
value keeps its text: ``data.name=1e-3`` is the string ``"1e-3"``, ``name=2024`` the string ``"2024"``.

Checks that need the data (``cc.k`` against the number of segments, missing feature files) are
in :func:`check_against_data`, run before any training.
"""
from __future__ import annotations

import copy
import math
import os
import re

import yaml

from ..objectives import objective_class
from .errors import ConfigError
from .schema import CHOICES, DEFAULTS, MAX_SEED, NON_NEGATIVE, POSITIVE, STRING_OR_NUMBER, string_valued


# Float literals as Python's float() reads them (optional sign; digits with single underscores between them;
# a dot or an exponent; inf / infinity / nan in any case). YAML 1.1 floats need a dot and a signed exponent.
_DIGITS = r"[0-9](?:_?[0-9])*"
_FLOAT_LITERAL = re.compile(
    rf"^[-+]?(?:(?:{_DIGITS})?\.{_DIGITS}(?:[eE][-+]?{_DIGITS})?"   # .5  1.5  1.5e3
    rf"|{_DIGITS}\.(?:[eE][-+]?{_DIGITS})?"                         # 5.  5.e-3
    rf"|{_DIGITS}[eE][-+]?{_DIGITS}"                                # 1e-3  1E+3
    r"|(?i:inf|infinity|nan))$")                                   # inf  -Infinity  NaN
_FLOAT_FIRST = list("-+0123456789.iInN")
_STR_TAG = "tag:yaml.org,2002:str"
_TEXT_KEPT = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, plus a resolver that makes every Python float literal a float."""


class _ConfigDumper(yaml.SafeDumper):
    """The safe dumper, quoting the strings that :class:`_ConfigLoader` would read as floats."""


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_LITERAL, _FLOAT_FIRST)
_ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_LITERAL, _FLOAT_FIRST)


def _keep_text(node, key: str) -> None:
    """Unquoted numbers and booleans at string-valued keys are read as their text, and so are keys
    that YAML 1.1 would read as booleans (``on``, ``off``, ``yes``, ``no``: ``cc: {on: input}``)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.style is None and k.tag == "tag:yaml.org,2002:bool":
                k.tag = _STR_TAG
            if isinstance(k, yaml.ScalarNode):
                _keep_text(v, f"{key}.{k.value}" if key else str(k.value))
    elif (isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in _TEXT_KEPT
          and string_valued(key)):
        node.tag = _STR_TAG


def load_yaml(stream, key: str = ""):
    """Parse a config YAML document (text or file object) the way config files and overrides are read:
    the safe loader with Python float literals as floats, and the text kept for unquoted values at
    string-valued keys (``key``: the dotted key the document's root stands for; "" for a whole file)."""
    loader = _ConfigLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _keep_text(node, key)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, path + ".")
        else:
            yield path, value


def flatten(tree: dict) -> dict:
    """``{"cc": {"alpha": 1}}`` -> ``{"cc.alpha": 1}`` (dotted keys of every leaf)."""
    return dict(_walk(tree))


def get(cfg: dict, key: str):
    """``get(cfg, "cc.alpha")`` -> the value at a dotted key."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_value(cfg: dict, key: str, value, source: str) -> None:
    """Set the dotted ``key`` of ``cfg`` to ``value`` (not yet validated); an unknown key, or a section
    given a value, raises :class:`ConfigError` naming ``source`` (the file or override it came from)."""
    parts = key.split(".")
    node, default = cfg, DEFAULTS
    for i, part in enumerate(parts):
        if not isinstance(default, dict) or part not in default:
            where = ".".join(parts[:i]) or "the top level"
            known = ", ".join(sorted(default)) if isinstance(default, dict) else "(none: a leaf)"
            raise ConfigError(f"{source}: unknown config key '{key}' ('{part}' is not in {where}; "
                              f"known: {known})")
        if i == len(parts) - 1:
            if isinstance(default[part], dict):
                raise ConfigError(f"{source}: '{key}' is a section, set its keys (e.g. {key}."
                                  f"{next(iter(default[part]))}=...)")
            node[part] = value
        else:
            node, default = node[part], default[part]


def merge(cfg: dict, tree: dict, source: str, prefix: str = "") -> None:
    """Set every leaf of the (nested or dotted) mapping ``tree`` in ``cfg`` (see :func:`set_value`)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(tree).__name__}")
    for key, value in tree.items():
        path = f"{prefix}{key}"
        default = get(DEFAULTS, prefix[:-1]) if prefix else DEFAULTS
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            merge(cfg, value, source, path + ".")
        else:
            set_value(cfg, path, value, source)


def _coerce(key: str, value, default):
    """Bring a YAML/command-line value to the default's type, or raise naming the key."""
    def bad(expected):
        return ConfigError(f"config key '{key}': expected {expected}, got {value!r} "
                           f"({type(value).__name__})")
    if key in STRING_OR_NUMBER:  # a number > 0 or "auto"
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number > 0 or 'auto'")
        return float(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("a list of numbers")
        return [float(v) for v in value]
    raise bad(type(default).__name__)  # pragma: no cover


def validate(cfg: dict) -> dict:
    """Type-check and range-check every key; returns ``cfg`` with values coerced to their types."""
    for key, default in _walk(DEFAULTS):
        value = _coerce(key, get(cfg, key), default)
        set_value(cfg, key, value, "validate")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}': expected one of {list(CHOICES[key])}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value}")
            if key in POSITIVE and value <= 0:
                raise ConfigError(f"config key '{key}': expected a value > 0, got {value}")
            if key in NON_NEGATIVE and value < 0:
                raise ConfigError(f"config key '{key}': expected a value >= 0, got {value}")
    if cfg["seed"] > MAX_SEED:
        raise ConfigError(f"config key 'seed': expected an integer in [0, 2**64 - 1], got {cfg['seed']}")
    if cfg["cc"]["alpha"] != "auto" and cfg["cc"]["alpha"] <= 0:
        raise ConfigError(f"config key 'cc.alpha': expected a number > 0 or 'auto', got "
                          f"{cfg['cc']['alpha']}")
    objective_class(cfg).check(cfg)  # what the exemplar objective (cc.loss) cannot work with
    tiou = cfg["eval"]["tiou"]
    if not tiou or not all(0 < t < 1 for t in tiou):
        raise ConfigError(f"config key 'eval.tiou': expected a non-empty list of numbers in (0, 1), "
                          f"got {tiou}")
    if cfg["data"]["sampler"] == "similar_pairs" and 2 * cfg["data"]["similar_pairs"] > cfg["data"]["batch_size"]:
        raise ConfigError(f"config key 'data.similar_pairs': expected at most data.batch_size / 2 = "
                          f"{cfg['data']['batch_size'] // 2} pairs, got {cfg['data']['similar_pairs']}")
    if cfg["cc"]["k"] > cfg["data"]["max_seqlen"]:
        raise ConfigError(f"config key 'cc.k': expected at most data.max_seqlen="
                          f"{cfg['data']['max_seqlen']} segments, got {cfg['cc']['k']}")
    if not cfg["data"]["root"] and not cfg["data"]["synthetic"]:
        raise ConfigError("config key 'data.root': expected a dataset folder (or set data.synthetic "
                          "to generate one), got ''")
    return cfg


def resolve_subsets(cfg: dict, dataset) -> tuple[list[int], list[int]]:
    """Video indices of the training and test subsets (config, or the dataset's convention). A video of
    neither subset would silently take part in nothing: it is an error naming the file and the video."""
    out, names = [], []
    for key, default in (("data.train_subset", "train_subset"), ("data.test_subset", "test_subset")):
        try:
            name = get(cfg, key) or getattr(dataset, default)
            out.append(list(dataset.indices(name)))
            names.append(name)
        except ValueError as exc:
            raise ConfigError(f"config key '{key}': {exc}") from None
    if names[0] == names[1]:
        raise ConfigError(f"config keys 'data.train_subset' and 'data.test_subset': expected two different "
                          f"subsets, got {names[0]!r} for both")
    for v in dataset.videos:
        if v.subset not in names:
            from ..data.dataset import DatasetError
            where = getattr(dataset, "subset_source", "") or dataset.source or dataset.name
            raise DatasetError(f"{where}: video {v.name!r} field 'subset' is {v.subset!r}, neither the training "
                               f"subset {names[0]!r} nor the test subset {names[1]!r}, so it would take part in "
                               f"nothing; give it one of them (or choose the subsets with data.train_subset / "
                               f"data.test_subset)")
    return out[0], out[1]


def check_against_data(cfg: dict, dataset, train_idx, test_idx) -> None:
    """Checks that need the loaded dataset; raise :class:`ConfigError` naming the key."""
    d = cfg["data"]
    if (d["rgb_dim"] and dataset.rgb_dim != d["rgb_dim"]) or not 0 < dataset.rgb_dim < dataset.feature_dim:
        raise ConfigError(f"config key 'data.rgb_dim': expected a split inside the feature width "
                          f"{dataset.feature_dim}, got {d['rgb_dim']}")
    lengths = [(len(dataset.videos[i].features), dataset.videos[i].name) for i in test_idx]
    shortest, name = min(lengths)
    if cfg["cc"]["k"] > shortest:
        raise ConfigError(f"config key 'cc.k': expected at most the number of segments of the shortest "
                          f"test video ({name}: {shortest}), got {cfg['cc']['k']}")


def parse_override(text: str):
    """``"cc.alpha=0.5"`` -> ``("cc.alpha", 0.5)``; the value is parsed as YAML (numbers, lists, bools)
    with every Python float literal a float (``train.lr=1e-3`` -> 0.001) and the text kept at
    string-valued keys (``data.name=1e-3`` -> ``"1e-3"``); see :func:`load_yaml`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw, key) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({exc})") from None
    return key, "" if value is None else value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                tree = load_yaml(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path}: invalid YAML ({exc})") from None
        merge(cfg, tree, str(path))
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value, f"override {text!r}")
    return validate(cfg)


def with_overrides(base: dict, overrides) -> dict:
    """A copy of ``base`` (a validated config) with ``key=value`` overrides applied, validated."""
    cfg = copy.deepcopy(base)
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value, f"override {text!r}")
    return validate(cfg)


def from_dict(tree: dict) -> dict:
    """Validate a config tree saved with a run (e.g. from a checkpoint) against the current defaults."""
    cfg = copy.deepcopy(DEFAULTS)
    merge(cfg, tree, "saved config")
    return validate(cfg)


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` (atomically); :func:`load_config` reads it back unchanged."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.dump(cfg, f, Dumper=_ConfigDumper, sort_keys=False)
    os.replace(tmp, path)


def to_yaml(cfg: dict) -> str:
    """``cfg`` as YAML text (strings that would read back as numbers are quoted)."""
    return yaml.dump(cfg, Dumper=_ConfigDumper, sort_keys=False)
