"""train/config.py: defaults tree, YAML, key=value overrides, validation messages; the CLI's handling."""
import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from train import cli
from train.config import (DEFAULTS, PRESETS, ConfigError, check_against_data, from_dict, load_config,
                          save_config)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    with pytest.raises(ConfigError, match=r"'data\.root'"):  # the defaults name no data
        load_config()
    cfg = load_config(None, ["data.synthetic=tiny"])
    expect = copy.deepcopy(DEFAULTS)
    expect["data"]["synthetic"] = "tiny"
    assert cfg == expect
    assert cfg["cc"]["weight"] == 1.0 and cfg["cc"]["alpha"] == "auto"  # the method's lambda


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata:\n  synthetic: tiny\ncc:\n  size: 10\n  alpha: 0.5\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["cc.size=12", "eval.tiou=[0.3,0.5]", "run.tensorboard=false"])
    assert cfg["name"] == "x"
    assert cfg["cc"]["size"] == 12            # override wins over YAML
    assert cfg["cc"]["alpha"] == 0.5          # YAML wins over defaults
    assert cfg["train"]["lr"] == 0.01
    assert cfg["eval"]["tiou"] == [0.3, 0.5]
    assert cfg["run"]["tensorboard"] is False
    assert cfg["model"]["embed_dim"] == DEFAULTS["model"]["embed_dim"]


def test_types_are_coerced():
    cfg = load_config(None, ["data.synthetic=tiny", "train.lr=1", "cc.alpha=2", "cc.fit_max_iter=10.0"])
    assert isinstance(cfg["train"]["lr"], float) and isinstance(cfg["cc"]["alpha"], float)
    assert cfg["cc"]["fit_max_iter"] == 10 and isinstance(cfg["cc"]["fit_max_iter"], int)


@pytest.mark.parametrize("override, match", [
    (["cc.sizee=3"], r"unknown config key 'cc\.sizee'"),
    (["foo=1"], r"unknown config key 'foo'"),
    (["cc=1"], r"'cc' is a section"),
    (["cc.size=abc"], r"'cc\.size': expected an integer, got 'abc'"),
    (["cc.size=0"], r"'cc\.size': expected a value > 0, got 0"),
    (["cc.alpha=-1"], r"'cc\.alpha': expected a number > 0 or 'auto', got -1"),
    (["cc.alpha=fast"], r"'cc\.alpha': expected a number > 0 or 'auto'"),
    (["cc.k=0"], r"'cc\.k': expected a value > 0"),
    (["cc.k=900"], r"'cc\.k': expected at most data\.max_seqlen=750 segments, got 900"),
    (["model.attention=lstm"], r"'model\.attention': expected one of \['untrimmednet', 'stpn'\]"),
    (["run.tensorboard=3"], r"'run\.tensorboard': expected true or false"),
    (["train.lr=.inf"], r"'train\.lr': expected a finite number"),
    (["cc.weight=-0.5"], r"'cc\.weight': expected a value >= 0"),
    (["eval.tiou=[0.5, 1.5]"], r"'eval\.tiou': expected a non-empty list of numbers in \(0, 1\)"),
    (["data.synthetic="], r"'data\.root': expected a dataset folder"),
    (["nonsense"], r"expected key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.synthetic=tiny"] + override if override != ["data.synthetic="]
                    else override)


def test_bad_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  synthetic: tiny\ncc:\n  rounds: 1\n  bandwidth: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'cc\.bandwidth'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("cc: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(path)


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["data.synthetic=tiny", "cc.alpha=0.25", "eval.tiou=[0.5]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert from_dict(copy.deepcopy(cfg)) == cfg


@pytest.mark.parametrize("name", ["synthetic", "tiny", "thumos14", "activitynet12"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    if name in PRESETS:  # the YAML and the built-in preset used by `demo` must not drift apart
        assert yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) == PRESETS[name]
    assert cfg["name"] == name


def _fake_dataset(lengths, subsets):
    videos = [SimpleNamespace(name=f"v{i}", subset=s, features=np.zeros((t, 8), np.float32))
              for i, (t, s) in enumerate(zip(lengths, subsets))]
    return SimpleNamespace(videos=videos, rgb_dim=4, feature_dim=8)


def test_k_larger_than_a_test_video():
    ds = _fake_dataset([10, 3, 12], ["validation", "test", "test"])
    cfg = load_config(None, ["data.synthetic=tiny", "cc.k=5"])
    with pytest.raises(ConfigError, match=r"'cc\.k': expected at most .* shortest test video \(v1: 3\), got 5"):
        check_against_data(cfg, ds, [0], [1, 2])
    cfg["cc"]["k"] = 3
    check_against_data(cfg, ds, [0], [1, 2])
    cfg["data"]["rgb_dim"] = 6
    with pytest.raises(ConfigError, match=r"'data\.rgb_dim'"):
        check_against_data(cfg, ds, [0], [1, 2])


def test_cli_stops_before_training(tmp_path, capsys):
    """Bad configs stop with exit code 2 and a message naming the key or file; nothing is trained."""
    run = tmp_path / "run"
    code = cli.main(["fit", "data.synthetic=tiny", "cc.size=0", f"run.dir={run}"])
    assert code == 2 and "'cc.size'" in capsys.readouterr().err
    assert not run.exists()
    missing = tmp_path / "nowhere"
    code = cli.main(["fit", f"data.root={missing}", "data.name=x", f"run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.root" in err and str(missing) in err
    assert not run.exists()
    # A folder that exists but lacks the feature files: the message names the missing file.
    (tmp_path / "empty").mkdir()
    code = cli.main(["fit", f"data.root={tmp_path / 'empty'}", "data.name=thumos", "data.layout=standard",
                     f"run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err and "thumos" in err
    assert not run.exists()
