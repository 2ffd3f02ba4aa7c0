from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from confkd.config import Config, LossConfig, apply_overrides, config_from_dict, load_config, save_config
from confkd.errors import ConfigError


def test_defaults_round_trip_through_dict() -> None:
    cfg = Config()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  lambda_kl: 2.5\npreprocess:\n  target_spacing: [1.25, 1.25]\n")
    cfg = load_config(path, ["loss.lambda_ent=0.3", "train.betas=[0.8, 0.95]", "data.weak_source=erosion"])
    assert cfg.loss.lambda_kl == 2.5
    assert cfg.loss.lambda_ent == pytest.approx(0.3)
    assert cfg.preprocess.target_spacing == (1.25, 1.25)
    assert cfg.train.betas == (0.8, 0.95)
    assert cfg.data.weak_source == "erosion"
    # untouched keys keep their defaults
    assert cfg.model == Config().model


def test_saved_config_loads_back_identically(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), ["model.width=8", "train.epochs=3", "preprocess.slice_axis=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  lambda_kll: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "loss.lambda_kll" in message
    assert "loss.lambda_kl" in message and "loss.temperature" in message
    assert str(path) in message


def test_unknown_section_and_override_key() -> None:
    with pytest.raises(ConfigError, match="valid keys here: data, preprocess, augment, model, loss, train, name"):
        config_from_dict({"optim": {}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rate'.*train\.lr"):
        apply_overrides(Config(), ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="not a config section"):
        apply_overrides(Config(), ["name.x=1"])
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides(Config(), ["loss.lambda_kl"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("loss.temperature=0", "loss.temperature=0.0 must be > 0"),
        ("loss.lambda_kl=-1", "must be >= 0"),
        ("loss.kl_on=teacher", "is not one of 'strong', 'weak', 'all'"),
        ("model.norm=group", "is not one of 'batch', 'instance'"),
        ("model.width=abc", "expected an integer"),
        ("train.betas=[0.9]", "expected 2 values"),
        ("preprocess.target_spacing=[1, 1, 1]", "needs 2 values"),
        ("preprocess.clip_percentiles=[99, 1]", "low < high"),
        ("loss.entropy_normalize=yes please", "expected true/false"),
        ("data.n_strong=-2", "must be >= 0"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [override])


def test_train_keys_for_logging_sampling_and_sync_batchnorm() -> None:
    cfg = Config().train
    assert (cfg.log_every, cfg.foreground_fraction, cfg.sync_batchnorm) == (10, 0.33, False)
    changed = apply_overrides(
        Config(), ["train.log_every=1", "train.foreground_fraction=0", "train.sync_batchnorm=true"]
    )
    assert (changed.train.log_every, changed.train.foreground_fraction, changed.train.sync_batchnorm) == (1, 0.0, True)
    for override, match in (
        ("train.log_every=0", r"train\.log_every=0 must be >= 1"),
        ("train.log_every=2.5", "expected an integer"),
        ("train.foreground_fraction=1.5", r"train\.foreground_fraction=1\.5 must be a fraction in \[0, 1\]"),
        ("train.foreground_fraction=-0.1", "must be a fraction"),
        ("train.sync_batchnorm=sometimes", "expected true/false"),
    ):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(Config(), [override])


def test_int_is_accepted_for_float_but_not_bool() -> None:
    assert apply_overrides(Config(), ["loss.lambda_kl=2"]).loss.lambda_kl == 2.0
    with pytest.raises(ConfigError):
        config_from_dict({"loss": {"lambda_kl": True}})


def test_configs_are_frozen() -> None:
    cfg = LossConfig()
    with pytest.raises(AttributeError):
        cfg.lambda_kl = 3.0  # type: ignore[misc]


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_presets_in_configs_folder_are_valid() -> None:
    folder = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(folder.glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        assert yaml.safe_load(path.read_text()) is not None
