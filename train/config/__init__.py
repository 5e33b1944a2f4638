"""The run configuration: one tree of defaults, a YAML file over it, ``key=value`` overrides, validated.

* :mod:`.schema`: every key, declared once (type, range or choices, one-line doc, phase); the tree of
  defaults and every list of keys are derived from it;
* :mod:`.loading`: YAML and overrides, validation, saving;
* :mod:`.presets`: the built-in presets (the demo's, the tests');
* :mod:`.reference`: ``docs/config.md``, generated from the schema.
"""
from .errors import ConfigError
from .loading import (check_against_data, flatten, from_dict, get, load_config, load_yaml, merge, parse_override,
                      resolve_subsets, save_config, set_value, to_yaml, validate, with_overrides)
from .presets import PRESETS
from .schema import (AFTER_STAGE1, CHOICES, DEFAULTS, EVALUATION_ONLY, KEY, KEYS, MAX_SEED, NON_NEGATIVE, POSITIVE,
                     RESUME_MAY_CHANGE, Key)

__all__ = ["ConfigError", "load_config", "from_dict", "validate", "with_overrides", "parse_override", "load_yaml",
           "save_config", "to_yaml", "flatten", "get", "set_value", "merge", "resolve_subsets", "check_against_data",
           "PRESETS", "DEFAULTS", "KEYS", "KEY", "Key", "CHOICES", "POSITIVE", "NON_NEGATIVE", "MAX_SEED",
           "AFTER_STAGE1", "EVALUATION_ONLY", "RESUME_MAY_CHANGE"]
