"""The config schema (train/config/schema.py): every key declared once with a type, a range or choices that
its default satisfies, a one-line doc and a phase; the lists that validation, resume and compare read are
derived from it."""
import copy

import pytest

from train.compare import FIXED
from train.config import (AFTER_STAGE1, CHOICES, DEFAULTS, EVALUATION_ONLY, KEY, KEYS, NON_NEGATIVE, POSITIVE,
                          RESUME_MAY_CHANGE, flatten, load_config, validate)
from train.config.schema import PHASES, SECTIONS, STRING_OR_NUMBER, string_valued


def test_every_key_is_declared_once_with_a_doc_and_a_phase():
    names = [k.name for k in KEYS]
    assert len(names) == len(set(names)) and set(KEY) == set(names)
    for k in KEYS:
        assert k.phase in PHASES, k.name
        assert k.doc and "\n" not in k.doc and k.doc == k.doc.strip(), k.name
        assert (k.name.split(".")[0] if "." in k.name else "") in SECTIONS, k.name


def test_the_defaults_tree_is_the_keys_in_order_and_satisfies_them():
    assert list(flatten(DEFAULTS)) == [k.name for k in KEYS]
    for k in KEYS:
        value = flatten(DEFAULTS)[k.name]
        if k.choices:
            assert value in k.choices, k.name
        if k.low is not None and isinstance(value, (int, float)):
            assert value > k.low if k.strict else value >= k.low, k.name
        assert k.kind in ("bool", "int", "float", "str", "list of numbers", 'number or "auto"'), k.name
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"]["synthetic"] = "tiny"  # the defaults name no dataset
    assert validate(cfg)["cc"] == DEFAULTS["cc"]


def test_the_lists_are_derived_from_the_declarations():
    assert CHOICES == {k.name: k.choices for k in KEYS if k.choices}
    assert POSITIVE == {k.name for k in KEYS if k.low == 0 and k.strict}
    assert NON_NEGATIVE == {k.name for k in KEYS if k.low == 0 and not k.strict}
    assert STRING_OR_NUMBER == {"cc.alpha", "cc.guard_fit_gap"}
    assert set(RESUME_MAY_CHANGE) == {k.name for k in KEYS if k.phase == "may change on resume"}
    assert set(RESUME_MAY_CHANGE) <= set(EVALUATION_ONLY) <= set(AFTER_STAGE1)
    assert FIXED == ("seed", "run.")  # what compare sets itself: the seed and the run.* keys, as prefixes


@pytest.mark.parametrize("key,phase", [
    ("seed", "stage 1"), ("data.standardize", "stage 1"), ("model.dropout", "stage 1"), ("loss.casl", "stage 1"),
    ("train.lr", "stage 1"), ("train.baseline_steps", "stage 1"), ("cc.weight", "after stage 1"),
    ("cc.loss", "after stage 1"), ("train.cc_steps", "after stage 1"), ("cc.select", "evaluation only"),
    ("cc.k", "evaluation only"), ("eval.smooth", "evaluation only"), ("eval.proposals", "evaluation only"),
    ("name", "label"), ("run.threads", "may change on resume"), ("run.dir", "may change on resume")])
def test_phases(key, phase):
    """What compare relies on: stage-1 keys get their own stage 1, evaluation-only keys only a new
    evaluation; what resume relies on: only run.* may change."""
    assert KEY[key].phase == phase
    assert (key in AFTER_STAGE1) == (phase != "stage 1")
    assert (key in EVALUATION_ONLY) == (phase in ("evaluation only", "label", "may change on resume"))


def test_string_keys_keep_their_text():
    assert string_valued("data.name") and string_valued("cc.loss")
    assert not string_valued("cc.alpha") and not string_valued("train.lr") and not string_valued("no.such")
    assert load_config(None, ["data.synthetic=tiny", "name=2024"])["name"] == "2024"


def test_ranges_and_types_in_words():
    assert KEY["cc.size"].range == "> 0" and KEY["cc.rounds"].range == ">= 0"
    assert KEY["cc.alpha"].range == '> 0 or "auto"' and KEY["cc.alpha"].kind == 'number or "auto"'
    assert KEY["cc.metric"].range == 'one of "sqeuclidean", "euclidean"' and KEY["eval.tiou"].kind == "list of numbers"
