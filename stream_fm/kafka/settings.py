"""Every setting stream_fm passes to its Kafka clients, in one table (units in the names).

``CLIENT_SETTINGS`` is the table: each entry names the setting, its value, and why it is
that value. ``consumer_config``, ``producer_config`` and ``security_config`` turn it, together
with the worker's ``Settings``, into the keyword arguments of the client library. A name that
is not in the table fails loudly, so a typo can never silently fall back to a client default.

>>> producer_config(produce_timeout_s=30.0)["acks"]
'all'
>>> client_setting("linger_ms")
5
>>> client_setting("lingr_ms")
Traceback (most recent call last):
...
KeyError: "unknown Kafka client setting 'lingr_ms'"
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Final

from stream_fm.config import Settings


@dataclass(frozen=True, slots=True)
class ClientSetting:
    name: str
    value: Any
    why: str


CLIENT_SETTINGS: Final = {
    s.name: s
    for s in (
        # consumer
        ClientSetting(
            "enable_auto_commit",
            False,
            "offsets are committed only after the checkpoint that covers them is durable",
        ),
        ClientSetting(
            "auto_offset_reset", "earliest", "a new group reads its input from the start"
        ),
        ClientSetting(
            "max_poll_interval_ms",
            300_000,
            "Kafka's default; outlives a broker restart, so the group survives it",
        ),
        ClientSetting("fetch_max_bytes", 52_428_800, "Kafka's default: 50 MiB per fetch"),
        ClientSetting(
            "max_heartbeat_interval_ms",
            3_000,
            "heartbeats every min(this, session_timeout_ms / 3), Kafka's advice",
        ),
        # producer
        ClientSetting("acks", "all", "a prediction counts once every in-sync replica has it"),
        ClientSetting("linger_ms", 5, "waits 5 ms to fill batches: far below the latency target"),
        ClientSetting(
            "batch_size_bytes",
            262_144,
            "per-partition batch; lowered to the smallest output topic limit at start-up",
        ),
        ClientSetting(
            "max_request_size_bytes",
            1_048_576,
            "Kafka's default; bounds every record, dead letters are truncated below it",
        ),
        ClientSetting(
            "retries", 2**31 - 1, "retry until delivery_timeout; the checkpoint decides what counts"
        ),
        ClientSetting(
            "max_request_timeout_ms", 30_000, "one request waits at most this (or less, see below)"
        ),
        # librdkafka only
        ClientSetting(
            "librdkafka_assignment_strategy",
            "cooperative-sticky",
            "a rebalance moves only the partitions that change owner; the rest keep serving",
        ),
        ClientSetting(
            "librdkafka_queue_max_messages",
            1_000_000,
            "records the producer may hold unacknowledged before produce() waits",
        ),
        # tools (simulator, benchmarks, tests)
        ClientSetting("tool_linger_ms", 5, "the simulator's and tools' producers batch likewise"),
    )
}


def client_setting(name: str) -> Any:
    """The value of one entry of the table; unknown names raise ``KeyError``."""
    try:
        return CLIENT_SETTINGS[name].value
    except KeyError:
        raise KeyError(f"unknown Kafka client setting {name!r}") from None


def security_config(settings: Settings | None) -> dict[str, Any]:
    """TLS and SASL settings in kafka-python's names; secrets are passed, never logged."""
    if settings is None:
        return {}
    config: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.sasl_mechanism == "OAUTHBEARER":
        from stream_fm.kafka.oauth import ClientCredentials

        config["sasl_mechanism"] = "OAUTHBEARER"
        config["sasl_oauth_token_provider"] = ClientCredentials(settings)
    elif settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        config["sasl_plain_username"] = settings.sasl_username or None
        config["sasl_plain_password"] = settings.sasl_password or None
    if not settings.security_protocol.endswith("SSL"):
        return config
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(settings, name):
            config[name] = getattr(settings, name)
    if settings.ssl_key_password:
        config["ssl_password"] = settings.ssl_key_password
    if settings.ssl_insecure_skip_hostname_check:
        config["ssl_check_hostname"] = False
    if settings.ssl_insecure_skip_verify:
        config["ssl_context"] = _unverified_context(settings)
    return config


def _unverified_context(settings: Settings) -> ssl.SSLContext:
    # kafka-python always verifies unless handed a context of its own.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if settings.ssl_certfile:
        context.load_cert_chain(
            settings.ssl_certfile, settings.ssl_keyfile or None, settings.ssl_key_password or None
        )
    return context


def consumer_config(settings: Settings) -> dict[str, Any]:
    """kafka-python ``KafkaConsumer`` arguments for the worker."""
    return {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "group_id": settings.group_id,
        "enable_auto_commit": client_setting("enable_auto_commit"),
        "auto_offset_reset": client_setting("auto_offset_reset"),
        "max_poll_records": settings.max_poll_records,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": min(
            client_setting("max_heartbeat_interval_ms"), settings.session_timeout_ms // 3
        ),
        "max_poll_interval_ms": client_setting("max_poll_interval_ms"),
        "fetch_max_bytes": client_setting("fetch_max_bytes"),
        **security_config(settings),
    }


def producer_config(
    settings: Settings | None = None,
    *,
    produce_timeout_s: float | None = None,
    batch_size_bytes: int | None = None,
) -> dict[str, Any]:
    """kafka-python ``KafkaProducer`` arguments (the worker's with ``settings``)."""
    timeout_s = produce_timeout_s if produce_timeout_s is not None else 30.0
    if settings is not None:
        timeout_s = settings.produce_timeout_s
    produce_timeout_ms = round(timeout_s * 1000)
    request_timeout_ms = min(client_setting("max_request_timeout_ms"), produce_timeout_ms)
    linger_ms = client_setting("linger_ms")
    config: dict[str, Any] = {
        "acks": client_setting("acks"),
        "linger_ms": linger_ms,
        "batch_size": batch_size_bytes or client_setting("batch_size_bytes"),
        "max_request_size": client_setting("max_request_size_bytes"),
        "retries": client_setting("retries"),
        "max_block_ms": produce_timeout_ms,
        "request_timeout_ms": request_timeout_ms,
        # kafka-python requires delivery > linger + request timeout.
        "delivery_timeout_ms": max(produce_timeout_ms, request_timeout_ms + linger_ms + 1000),
    }
    if settings is not None:
        config["bootstrap_servers"] = settings.bootstrap_servers.split(",")
        config["client_id"] = settings.client_id
        config |= security_config(settings)
        if settings.transactional_id:
            config["transactional_id"] = settings.transactional_id
    return config


_SECURITY_LIBRDKAFKA = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
}


def _librdkafka_security(settings: Settings) -> dict[str, Any]:
    config = {
        _SECURITY_LIBRDKAFKA[name]: value
        for name, value in security_config(settings).items()
        if value is not None and name in _SECURITY_LIBRDKAFKA
    }
    if settings.sasl_mechanism == "OAUTHBEARER":  # librdkafka fetches the token itself
        config |= {
            "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.token.endpoint.url": settings.sasl_oauthbearer_token_endpoint_url,
            "sasl.oauthbearer.client.id": settings.sasl_oauthbearer_client_id,
            "sasl.oauthbearer.client.secret": settings.sasl_oauthbearer_client_secret,
        }
        if settings.sasl_oauthbearer_scope:
            config["sasl.oauthbearer.scope"] = settings.sasl_oauthbearer_scope
    if settings.security_protocol.endswith("SSL"):
        # librdkafka checks the host name since 1.9; said here so both clients agree.
        skip_host = settings.ssl_insecure_skip_hostname_check or settings.ssl_insecure_skip_verify
        config["ssl.endpoint.identification.algorithm"] = "none" if skip_host else "https"
        if settings.ssl_insecure_skip_verify:
            config["enable.ssl.certificate.verification"] = False
    return config


def librdkafka_consumer(settings: Settings) -> dict[str, Any]:
    """confluent-kafka ``Consumer`` configuration for the worker (librdkafka's names)."""
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "group.id": settings.group_id,
        "enable.auto.commit": client_setting("enable_auto_commit"),
        "enable.auto.offset.store": False,
        "auto.offset.reset": client_setting("auto_offset_reset"),
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": min(
            client_setting("max_heartbeat_interval_ms"), settings.session_timeout_ms // 3
        ),
        "max.poll.interval.ms": client_setting("max_poll_interval_ms"),
        "fetch.max.bytes": client_setting("fetch_max_bytes"),
        "partition.assignment.strategy": client_setting("librdkafka_assignment_strategy"),
        # As kafka-python reads: every record, transactional or not.
        "isolation.level": "read_uncommitted",
        **_librdkafka_security(settings),
    }


def librdkafka_producer(settings: Settings, batch_size_bytes: int | None = None) -> dict[str, Any]:
    """confluent-kafka ``Producer`` configuration for the worker (librdkafka's names)."""
    kafka_python = producer_config(settings, batch_size_bytes=batch_size_bytes)
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "acks": client_setting("acks"),
        "linger.ms": client_setting("linger_ms"),
        "batch.size": kafka_python["batch_size"],
        # librdkafka's bound covers the request's framing too: room above the record bound.
        "message.max.bytes": client_setting("max_request_size_bytes") + 65_536,
        "enable.idempotence": True,
        "request.timeout.ms": kafka_python["request_timeout_ms"],
        "delivery.timeout.ms": kafka_python["delivery_timeout_ms"],
        "queue.buffering.max.messages": client_setting("librdkafka_queue_max_messages"),
        # Kafka's default partitioner (murmur2), so both clients put an id in one place.
        "partitioner": "murmur2_random",
        **_librdkafka_security(settings),
    }
    if settings.transactional_id:
        config["transactional.id"] = settings.transactional_id
    return config
