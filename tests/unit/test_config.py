"""The run config: one list of knobs, the same in pyproject.toml and common/config.py."""

from pathlib import Path

import pytest

from fedrec.common.config import DEFAULTS, ConfigError, RunConfig, pyproject_defaults

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_lists_every_knob_with_the_same_default():
    assert pyproject_defaults(ROOT / "pyproject.toml") == DEFAULTS


def test_flower_style_flat_config_round_trips_and_parses_inf():
    cfg = RunConfig.from_flower({**DEFAULTS, "privacy.epsilon": "inf", "mf.dim": "4"})
    assert not cfg.dp_enabled and cfg.train.mf_dim == 4
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("privacy.epsilon", 0, "privacy.epsilon must be > 0"),
        ("privacy.noise-mode", "central", "noise-mode"),
        ("rounds", "two", "'rounds' = 'two' is not a valid int"),
        ("privacy.epsilonn", 1.0, "unknown run-config key"),
    ],
)
def test_bad_knobs_fail_with_the_knob_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig().override(**{key: value})
