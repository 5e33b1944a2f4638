"""Variants (train/compare/variants.py): parsing, the keys a comparison sets itself, unknown keys."""
from pathlib import Path

import pytest

from train.compare import Comparison, load_variants, parse_variants
from train.config import ConfigError, load_config


ROOT = Path(__file__).resolve().parents[3]
TINY = ["train.baseline_steps=10", "train.cc_steps=6", "cc.rounds=1", "eval.figures=0"]


def _base():
    return load_config(ROOT / "configs" / "tiny.yaml", TINY)


def test_variants_parse_and_refuse_stage1_keys(tmp_path):
    assert parse_variants({"a": {"cc": {"weight": 2}}, "b": {"train.cc_steps": 3}, "c": None}) == {
        "a": {"cc.weight": 2}, "b": {"train.cc_steps": 3}, "c": {}}
    with pytest.raises(ConfigError, match=r"variant 'x': key 'seed' is set by the comparison"):
        parse_variants({"x": {"seed": 3}})
    with pytest.raises(ConfigError, match=r"variant name 'stage1'"):
        parse_variants({"stage1": {}})
    path = tmp_path / "v.yaml"
    path.write_text("lam: {cc.weight: 5e-1}\ninput: {cc: {on: input}}\n")
    assert load_variants(str(path), ["det: {cc.detach_attention: true}"]) == {
        "lam": {"cc.weight": 0.5}, "input": {"cc.on": "input"}, "det": {"cc.detach_attention": True}}
    with pytest.raises(ConfigError, match=r"--variant 'oops'"):
        load_variants(None, ["oops"])
    with pytest.raises(ConfigError, match=r"unknown config key 'cc\.nonsense'"):
        Comparison(_base(), {"bad": {"cc.nonsense": 1}}, [0], tmp_path / "c")
