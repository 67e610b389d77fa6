"""Settings: defaults < TOML < env < flags; unknown or invalid settings name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_fm.config import SPECS, describe, load_settings, read_secret_files
from stream_fm.errors import ConfigError
from stream_fm.tools.broker.tls import CertificateAuthority


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
        ({"overrides": {"model_sync_precision": "float16"}}, "model_sync_precision"),
        ({"overrides": {"model_sync_hold_threshold": "1.5"}}, "model_sync_hold_threshold"),
        ({"overrides": {"model_sync_max_hold_ms": "100"}}, "model_sync_max_hold_ms"),
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


def test_secrets_come_from_files_are_masked_and_never_in_repr(tmp_path: Path) -> None:
    password = tmp_path / "sasl-password"
    password.write_text("s3cret-from-a-Secret\n")
    env = {"STREAM_FM_SASL_PASSWORD_FILE": str(password), "STREAM_FM_SASL_USERNAME": "ann"}
    settings = load_settings(env=env)
    assert settings.sasl_password == "s3cret-from-a-Secret"  # one trailing newline dropped
    assert "s3cret" not in repr(settings) and "s3cret" not in str(describe(settings))
    password.write_text("rotated\n")  # a rotated Secret: read again after a refused login
    assert read_secret_files(settings).sasl_password == "rotated"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"STREAM_FM_SASL_PASSWORD_FILE": "/nonexistent/pw"}, r"^sasl_password_file: cannot read"),
        (
            {"STREAM_FM_SASL_PASSWORD": "a", "STREAM_FM_SASL_PASSWORD_FILE": "/x"},
            r"^sasl_password_file: give sasl_password or sasl_password_file, not both",
        ),
        (
            {"STREAM_FM_SECURITY_PROTOCOL": "SSL", "STREAM_FM_SSL_CERTFILE": __file__},
            r"^ssl_keyfile: mutual TLS needs both",
        ),
    ],
)
def test_bad_secret_and_tls_settings_fail_at_start_up_naming_the_setting(
    env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(env=env)


def test_a_certificate_or_key_that_does_not_load_fails_at_start_up(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    issued = ca.issue("client", key_password="right")
    base = {
        "STREAM_FM_SECURITY_PROTOCOL": "SSL",
        "STREAM_FM_SSL_CAFILE": str(ca.cert_path),
        "STREAM_FM_SSL_CERTFILE": str(issued.cert),
        "STREAM_FM_SSL_KEYFILE": str(issued.key),
    }
    assert load_settings(env=base | {"STREAM_FM_SSL_KEY_PASSWORD": "right"}).ssl_key_password
    with pytest.raises(ConfigError, match=r"^ssl_keyfile: cannot load .*wrong ssl_key_password"):
        load_settings(env=base | {"STREAM_FM_SSL_KEY_PASSWORD": "wrong"})
    with pytest.raises(ConfigError, match=r"^ssl_cafile: .* holds no usable PEM certificate"):
        load_settings(env=base | {"STREAM_FM_SSL_CAFILE": __file__})


def test_variables_read_elsewhere_are_not_settings() -> None:
    """The real logs' folder (tests, benchmarks) and the Kafka jars' cache share the prefix."""
    env = {"STREAM_FM_DATA_DIR": "/data", "STREAM_FM_KAFKA_CACHE": "/cache", "STREAM_FM_K": "4"}
    assert load_settings(env=env).model.k == 4
