from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsss.config import Config, apply_overrides, config_hash, load_config, save_config
from wsss.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_file(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  synth:\n    n_train: 7\n"))
    assert cfg.data.synth.n_train == 7 and cfg.data.source == "synth"


def test_unknown_key_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "data:\n  synth:\n    n_trian: 7\n"))
    msg = str(e.value)
    assert "unknown config key 'data.synth.n_trian'" in msg and "n_train" in msg and "c.yaml" in msg


def test_unknown_section_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'trian_cls'"):
        load_config(write(tmp_path, "trian_cls: {}\n"))


@pytest.mark.parametrize("override,needle", [
    ("data.synth.n_train=abc", "valid integer"),
    ("data.synth.n_train=0", "greater than or equal to 1"),
    ("data.source=ftp", "'synth', 'voc', 'coco' or 'csv'"),
    ("data.synth.part_frac=2", "less than 0.6"),
    ("train_cls.scale_range=[2, 1]", "low <= high"),
    ("data.synth.n_train.x=1", "'data.synth.n_train': Input should be a valid integer"),
    ("novalue", "not of the form"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_override_into_a_value_is_not_a_section(tmp_path):
    with pytest.raises(ConfigError, match="'data.synth.n_train' is not a section"):
        load_config(write(tmp_path, "data:\n  synth:\n    n_train: 5\n"), ["data.synth.n_train.x=1"])


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["data.synth.n_train=12", "train_cls.scale_range=[0.5, 1.5]", "train_cls.pretrained=true", "run.out_dir=x/y"])
    assert cfg.data.synth.n_train == 12 and cfg.train_cls.scale_range == (0.5, 1.5)
    assert cfg.train_cls.pretrained is True and cfg.run.out_dir == Path("x/y")


def test_voc_needs_root():
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.source=voc"])


def test_apply_overrides_does_not_modify_input():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.b=2", "a.c.d=3"])
    assert raw == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": {"d": 3}}}


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(write(tmp_path, "data: [1,\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_safe_loader_refuses_python_objects(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "run: !!python/object/apply:os.system ['echo hi']\n"))


def test_save_roundtrip_and_hash(tmp_path):
    cfg = load_config(None, ["data.synth.seed=3"])
    save_config(cfg, tmp_path / "r.yaml")
    again = Config.model_validate(yaml.safe_load((tmp_path / "r.yaml").read_text()))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["data.synth.seed=4"])) != config_hash(cfg)


def test_every_shipped_config_loads():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_say_what_they_are_for(path):
    from wsss.config import load_config

    load_config(path)
    assert path.read_text().startswith("# "), "each config starts with a comment saying what it is for"
