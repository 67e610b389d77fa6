"""Settings: defaults < TOML < env < flags; unknown or invalid settings name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_fm.config import SPECS, describe, load_settings
from stream_fm.errors import ConfigError


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('group_id = "from-toml"\nmax_poll_records = 10\n[model]\nk = 4\n')
    settings = load_settings(
        config,
        env={"STREAM_FM_MAX_POLL_RECORDS": "20", "STREAM_FM_INPUT_TOPICS": "imps, clicks"},
        overrides={"k": "6"},
    )
    assert settings.group_id == "from-toml"
    assert settings.max_poll_records == 20
    assert settings.input_topics == ("imps", "clicks")
    assert settings.model.k == 6


@pytest.mark.parametrize(
    ("source", "setting"),
    [
        ({"env": {"STREAM_FM_BOOTSTRAP_SERVER": "x"}}, "STREAM_FM_BOOTSTRAP_SERVER"),
        ({"overrides": {"max_poll_record": 1}}, "max_poll_record"),
        ({"env": {"STREAM_FM_MAX_POLL_RECORDS": "many"}}, "max_poll_records"),
        ({"env": {"STREAM_FM_MAX_POLL_RECORDS": "0"}}, "max_poll_records"),
        ({"overrides": {"attribution_window_s": "-1"}}, "attribution_window_s"),
        ({"overrides": {"consumer_stall_timeout_s": "0.5"}}, "consumer_stall_timeout_s"),
        ({"overrides": {"security_protocol": "TLS"}}, "security_protocol"),
        ({"overrides": {"security_protocol": "SASL_SSL"}}, "sasl_mechanism"),
        ({"overrides": {"ssl_cafile": "/nonexistent/ca.pem"}}, "ssl_cafile"),
        ({"overrides": {"input_topics": "a,b,c"}}, "input_topics"),
        ({"overrides": {"predictions_topic": "ad-events"}}, "predictions_topic"),
        ({"overrides": {"numeric_transform": "sqrt"}}, "numeric_transform"),
        ({"overrides": {"checkpoint_keep": "1"}}, "checkpoint_keep"),
        ({"overrides": {"cold_start": "maybe"}}, "cold_start"),
    ],
)
def test_bad_setting_fails_naming_it(source: dict[str, dict[str, object]], setting: str) -> None:
    env = source.get("env", {})
    with pytest.raises(ConfigError) as caught:
        load_settings(
            env={str(k): str(v) for k, v in env.items()}, overrides=source.get("overrides")
        )
    assert str(caught.value).startswith(setting + ":")


def test_unknown_toml_key_and_bad_toml(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("bootstrap_servrs = 'x'\n")
    with pytest.raises(ConfigError, match=r"^bootstrap_servrs: unknown setting"):
        load_settings(config, env={})
    config.write_text("bootstrap_servers = \n")
    with pytest.raises(ConfigError, match=r"^config: "):
        load_settings(config, env={})


def test_every_setting_has_help_and_settings_are_frozen() -> None:
    assert all(spec.help for spec in SPECS.values())
    settings = load_settings(env={})
    with pytest.raises(AttributeError):
        settings.group_id = "other"  # type: ignore[misc]


def test_describe_masks_the_password() -> None:
    settings = load_settings(env={"STREAM_FM_SASL_PASSWORD": "hunter2"})
    assert describe(settings)["sasl_password"] == "***"


def test_variables_read_elsewhere_are_not_settings() -> None:
    """The real logs' folder (tests, benchmarks) and the Kafka jars' cache share the prefix."""
    env = {"STREAM_FM_DATA_DIR": "/data", "STREAM_FM_KAFKA_CACHE": "/cache", "STREAM_FM_K": "4"}
    assert load_settings(env=env).model.k == 4
