"""The client settings table: every value documented, unknown names loud, secrets passed."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from stream_fm.config import build_settings
from stream_fm.kafka.settings import (
    CLIENT_SETTINGS,
    client_setting,
    consumer_config,
    librdkafka_consumer,
    producer_config,
    security_config,
)
from stream_fm.tools.broker.tls import CertificateAuthority


def test_every_entry_says_why_and_has_its_unit_in_its_name() -> None:
    for name, entry in CLIENT_SETTINGS.items():
        assert entry.name == name and len(entry.why) > 20, name
        if isinstance(entry.value, int) and not isinstance(entry.value, bool):
            assert name.endswith(("_ms", "_bytes", "_messages")) or name == "retries", name


def test_unknown_setting_fails_loudly() -> None:
    with pytest.raises(KeyError, match="unknown Kafka client setting 'linger'"):
        client_setting("linger")


def test_consumer_never_auto_commits_and_heartbeats_within_a_third_of_the_session() -> None:
    settings = build_settings({"session_timeout_ms": 6000, "max_poll_records": 300})
    config = consumer_config(settings)
    assert config["enable_auto_commit"] is False
    assert config["heartbeat_interval_ms"] == 2000
    assert config["max_poll_records"] == 300
    assert config["group_id"] == settings.group_id


def test_producer_waits_for_all_replicas_and_bounds_delivery_by_the_produce_timeout() -> None:
    config = producer_config(build_settings({"produce_timeout_s": 10.0}))
    assert config["acks"] == "all"
    assert config["request_timeout_ms"] == 10_000
    assert config["delivery_timeout_ms"] > config["linger_ms"] + config["request_timeout_ms"]
    assert config["max_request_size"] == client_setting("max_request_size_bytes")
    assert "transactional_id" not in config
    transactional = producer_config(build_settings({"transactional_id": "pod-0"}))
    assert transactional["transactional_id"] == "pod-0"


def test_sasl_settings_are_passed_through() -> None:
    settings = build_settings(
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "u",
            "sasl_password": "secret",
        }
    )
    assert security_config(settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "u",
        "sasl_plain_password": "secret",
    }
    assert security_config(None) == {}


def test_tls_settings_reach_both_clients_and_verification_is_on_unless_named_insecure(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.create(tmp_path)
    client = ca.issue("client", key_password="kp")
    values = {
        "security_protocol": "SSL",
        "ssl_cafile": str(ca.cert_path),
        "ssl_certfile": str(client.cert),
        "ssl_keyfile": str(client.key),
        "ssl_key_password": "kp",
    }
    settings = build_settings(values)
    kafka_python = security_config(settings)
    assert kafka_python["ssl_password"] == "kp" and "ssl_check_hostname" not in kafka_python
    rdkafka = librdkafka_consumer(settings)
    assert rdkafka["ssl.key.password"] == "kp"
    assert rdkafka["ssl.endpoint.identification.algorithm"] == "https"
    assert "enable.ssl.certificate.verification" not in rdkafka
    insecure = build_settings(values | {"ssl_insecure_skip_verify": True})
    assert security_config(insecure)["ssl_context"].verify_mode == ssl.CERT_NONE
    assert librdkafka_consumer(insecure)["enable.ssl.certificate.verification"] is False
    no_host = build_settings(values | {"ssl_insecure_skip_hostname_check": True})
    assert security_config(no_host)["ssl_check_hostname"] is False
    assert librdkafka_consumer(no_host)["ssl.endpoint.identification.algorithm"] == "none"
