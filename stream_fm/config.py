"""One frozen, validated ``Settings`` object, built at the edge.

Sources, later ones winning: defaults, a TOML file (``--config``), environment variables
``STREAM_FM_<SETTING>``, command-line flags. This module is the only reader of the TOML file
and of ``STREAM_FM_*``; an unknown or invalid setting fails here with one line naming it.
Model settings are the fields of ``FMParams`` under the same flat names.

>>> s = load_settings(env={"STREAM_FM_ATTRIBUTION_WINDOW_S": "600"}, overrides={"k": 4})
>>> s.attribution_window_s, s.model.k
(600.0, 4)
>>> load_settings(env={"STREAM_FM_BATCH_SIZ": "1"})
Traceback (most recent call last):
...
stream_fm.errors.ConfigError: STREAM_FM_BATCH_SIZ: unknown setting (environment variable)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import ssl
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import tomllib

from stream_fm.errors import ConfigError
from stream_fm.features import NUMERIC_TRANSFORMS, check_hashing
from stream_fm.join import LABEL_POLICIES
from stream_fm.model.params import FMParams, help_text

#: How model updates carry their row values (``sync.wire``).
MODEL_SYNC_PRECISIONS: Final = ("bfloat16", "float32")

ENV_PREFIX: Final = "STREAM_FM_"
# Variables with the prefix that are read elsewhere and are not settings (the Kafka jars'
# cache and version; the folder of real ad logs the benchmarks and tests read).
NON_SETTING_ENV: Final = frozenset(
    {"STREAM_FM_KAFKA_CACHE", "STREAM_FM_KAFKA_VERSION", "STREAM_FM_DATA_DIR"}
)
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
KAFKA_CLIENTS: Final = {"kafka-python": "kafka", "confluent": "confluent_kafka"}  # -> module


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the worker, replay and simulator; see ``stream-fm run --help``."""

    # Kafka
    bootstrap_servers: str = field(
        default="127.0.0.1:9092", metadata=help_text("Kafka bootstrap servers, comma-separated")
    )
    group_id: str = field(default="stream-fm", metadata=help_text("consumer group id"))
    client_id: str = field(default="stream-fm", metadata=help_text("Kafka client id"))
    kafka_client: str = field(
        default="kafka-python",
        metadata=help_text(
            "kafka-python (pure Python, installed with stream-fm) or confluent (librdkafka: "
            "about 3x the throughput; needs the librdkafka extra)"
        ),
    )
    transactional_id: str = field(
        default="",
        metadata=help_text(
            "exactly-once output: outputs go out in Kafka transactions committed together with "
            "the input offsets at each checkpoint (read_committed readers see each prediction "
            "once). Unique per worker and stable across its restarts, e.g. the pod name; "
            "empty = at-least-once"
        ),
    )
    input_topics: tuple[str, ...] = field(
        default=("ad-events",),
        metadata=help_text(
            "one topic with impressions and clicks, or two (impressions,clicks) with equal partition counts"
        ),
    )
    predictions_topic: str = field(
        default="ad-predictions", metadata=help_text("output topic for served probabilities")
    )
    dead_letter_topic: str = field(
        default="ad-events-dlq", metadata=help_text("topic for records that could not be decoded")
    )
    labels_topic: str = field(
        default="",
        metadata=help_text("optional training-log topic (id, label, served p, times); empty = off"),
    )
    security_protocol: str = field(
        default="PLAINTEXT", metadata=help_text("PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    )
    sasl_mechanism: str = field(
        default="", metadata=help_text("PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI")
    )
    sasl_username: str = field(default="", metadata=help_text("SASL user name"))
    sasl_password: str = field(
        default="",
        repr=False,
        metadata=help_text("SASL password (prefer sasl_password_file: a flag shows in ps)"),
    )
    sasl_password_file: str = field(
        default="",
        metadata=help_text(
            "file holding the SASL password (a mounted Secret); read at start and again after "
            "an authentication failure, so a rotated Secret takes effect without a restart"
        ),
    )
    sasl_oauthbearer_token_endpoint_url: str = field(
        default="",
        metadata=help_text("OAUTHBEARER: the OpenID Connect token endpoint (client credentials)"),
    )
    sasl_oauthbearer_client_id: str = field(
        default="", metadata=help_text("OAUTHBEARER: the client id at the token endpoint")
    )
    sasl_oauthbearer_client_secret: str = field(
        default="",
        repr=False,
        metadata=help_text("OAUTHBEARER: the client secret (prefer the _file setting)"),
    )
    sasl_oauthbearer_client_secret_file: str = field(
        default="",
        metadata=help_text("file holding sasl_oauthbearer_client_secret"),
    )
    sasl_oauthbearer_scope: str = field(
        default="", metadata=help_text("OAUTHBEARER: scope requested with the token (optional)")
    )
    ssl_cafile: str = field(
        default="", metadata=help_text("CA bundle for SSL (empty: the system's CAs)")
    )
    ssl_certfile: str = field(
        default="", metadata=help_text("client certificate for mutual TLS (PEM)")
    )
    ssl_keyfile: str = field(default="", metadata=help_text("client key for mutual TLS (PEM)"))
    ssl_key_password: str = field(
        default="",
        repr=False,
        metadata=help_text("password of an encrypted ssl_keyfile (prefer ssl_key_password_file)"),
    )
    ssl_key_password_file: str = field(
        default="",
        metadata=help_text("file holding ssl_key_password; read like sasl_password_file"),
    )
    ssl_insecure_skip_hostname_check: bool = field(
        default=False,
        metadata=help_text("INSECURE: accept a broker certificate issued for another host name"),
    )
    ssl_insecure_skip_verify: bool = field(
        default=False,
        metadata=help_text(
            "INSECURE: accept any broker certificate (no CA and no host name check)"
        ),
    )
    auth_failure_exit_s: float = field(
        default=300.0,
        metadata=help_text(
            "a refusal by the cluster (authentication, certificate or ACL) that lasts this long "
            "ends the worker with exit code 3, so an orchestrator shows it; 0 = never"
        ),
    )
    poll_timeout_ms: int = field(
        default=200, metadata=help_text("longest wait for records in one poll")
    )
    max_poll_records: int = field(default=5000, metadata=help_text("records per batch at most"))
    session_timeout_ms: int = field(
        default=45_000,
        metadata=help_text(
            "a worker silent this long (crashed, killed) leaves the group and its partitions "
            "move (Kafka's session.timeout.ms; the broker bounds it, 6000 at least by default)"
        ),
    )
    produce_timeout_s: float = field(
        default=30.0,
        metadata=help_text("wait for output acknowledgements before failing the batch"),
    )
    consumer_stall_timeout_s: float = field(
        default=30.0,
        metadata=help_text(
            "a consumer behind the log end that fetched nothing for this long is replaced "
            "(0: never)"
        ),
    )
    # One model per group
    model_updates_topic: str = field(
        default="",
        metadata=help_text(
            "one model per consumer group: every worker publishes what it learned to this topic "
            "and adds its peers' updates to its model (created at start-up if absent; one "
            "topic per group); empty = each worker learns only its own partitions"
        ),
    )
    model_sync_interval_ms: int = field(
        default=200,
        metadata=help_text(
            "how often a worker publishes what it learned since it last did (wall-clock "
            "rounds; shorter keeps young models closer to one worker's, longer sends less)"
        ),
    )
    model_sync_precision: str = field(
        default="bfloat16",
        metadata=help_text(
            "how model updates carry weights and sums: bfloat16 (half the bytes; what it "
            "rounds off is sent with the bucket's next update) or float32"
        ),
    )
    model_sync_hold_threshold: float = field(
        default=0.03,
        metadata=help_text(
            "a bucket whose weight and latents moved less than this (in logit units) since "
            "they last went out waits, and goes out with its next increments (0: every "
            "increment at once)"
        ),
    )
    model_sync_max_hold_ms: int = field(
        default=5000,
        metadata=help_text(
            "the longest an increment waits; a checkpoint and a SIGTERM send every waiting one"
        ),
    )
    # Events and features
    max_event_bytes: int = field(
        default=65_536, metadata=help_text("records larger than this go to the dead-letter topic")
    )
    hash_bits: int = field(
        default=20, metadata=help_text("features are hashed into 2^hash_bits buckets")
    )
    hash_seed: int = field(default=0, metadata=help_text("MurmurHash3 seed of the feature hasher"))
    numeric_transform: str = field(
        default="signed_log1p",
        metadata=help_text(f"numeric feature transform: {', '.join(NUMERIC_TRANSFORMS)}"),
    )
    max_features: int = field(default=1000, metadata=help_text("features per event at most"))
    max_future_skew_s: float = field(
        default=3600.0,
        metadata=help_text(
            "a ts further than this ahead of the worker's clock is a dead letter (ts_in_future), "
            "so one bad clock cannot close every open window; 0 = no check (Kafka's own "
            "message.timestamp.after.max.ms defaults to one hour)"
        ),
    )
    # Join and evaluation
    attribution_window_s: float = field(
        default=3600.0,
        metadata=help_text("a click within this many seconds of its impression makes it positive"),
    )
    label_policy: str = field(
        default="fake_negative",
        metadata=help_text(
            "when an impression is learned: fake_negative (at once as a negative, again as a "
            "positive on its click, with unbiasing weights), window (once, when its window "
            "closes) or click_early (positives on click, negatives at window close)"
        ),
    )
    max_pending_impressions: int = field(
        default=2_000_000,
        metadata=help_text(
            "pending-impression buffer bound; the oldest are learned as negatives when full"
        ),
    )
    auc_window: int = field(
        default=100_000,
        metadata=help_text("examples in the rolling window for AUC and windowed log loss"),
    )
    # Checkpoints
    checkpoint_dir: str = field(
        default="checkpoints",
        metadata=help_text("directory of checkpoint generations (may be a shared volume)"),
    )
    checkpoint_interval_s: float = field(
        default=30.0, metadata=help_text("checkpoint at least this often")
    )
    checkpoint_every_events: int = field(
        default=1_000_000,
        metadata=help_text("checkpoint after this many events even if the interval has not passed"),
    )
    checkpoint_keep: int = field(default=3, metadata=help_text("checkpoint generations kept"))
    cold_start: bool = field(
        default=False,
        metadata=help_text(
            "start without a checkpoint even though the group has committed offsets"
        ),
    )
    apply_log_path: str = field(
        default="",
        metadata=help_text(
            "audit: append every applied batch's (topic, partition, offset) list, restore, "
            "checkpoint and rollback to this JSON-lines file (off when empty)"
        ),
    )
    # Operations
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=help_text(
            "address of the /metrics, /healthz, /readyz server (0.0.0.0 in a container)"
        ),
    )
    metrics_port: int = field(
        default=9464, metadata=help_text("port of the metrics server; 0 picks a free one")
    )
    metrics_web_config: str = field(
        default="",
        metadata=help_text(
            "Prometheus exporter-toolkit web config file: TLS for /metrics, /healthz, /readyz "
            "(tls_server_config) and basic auth on /metrics (basic_auth_users, bcrypt); "
            "empty = plain HTTP"
        ),
    )
    log_level: str = field(default="INFO", metadata=help_text("DEBUG, INFO, WARNING or ERROR"))
    model: FMParams = field(default_factory=FMParams, metadata=help_text("FM hyperparameters"))

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def attribution_window_ms(self) -> int:
        return round(self.attribution_window_s * 1000)

    @property
    def output_topics(self) -> list[str]:
        """Predictions, dead letters and (when on) labels."""
        topics = [self.predictions_topic, self.dead_letter_topic]
        return topics + ([self.labels_topic] if self.labels_topic else [])


def _validate(s: Settings) -> None:
    def require(ok: bool, setting: str, problem: str) -> None:
        if not ok:
            raise ConfigError(setting, problem)

    require(bool(s.bootstrap_servers.strip()), "bootstrap_servers", "must not be empty")
    require(
        1 <= len(s.input_topics) <= 2, "input_topics", "give one topic or two (impressions,clicks)"
    )
    require(all(s.input_topics), "input_topics", "topic names must not be empty")
    require(len(set(s.input_topics)) == len(s.input_topics), "input_topics", "topics must differ")
    require(bool(s.predictions_topic), "predictions_topic", "must not be empty")
    require(bool(s.dead_letter_topic), "dead_letter_topic", "must not be empty")
    outputs = {s.predictions_topic, s.dead_letter_topic, s.labels_topic} - {""}
    require(
        not outputs & set(s.input_topics),
        "predictions_topic",
        "an output topic is also an input topic",
    )
    require(
        s.kafka_client in KAFKA_CLIENTS,
        "kafka_client",
        f"must be one of {', '.join(KAFKA_CLIENTS)}",
    )
    require(
        importlib.util.find_spec(KAFKA_CLIENTS[s.kafka_client]) is not None,
        "kafka_client",
        f"{s.kafka_client} is not installed: pip install 'stream-fm[librdkafka]'",
    )
    require(
        s.security_protocol in SECURITY_PROTOCOLS,
        "security_protocol",
        f"must be one of {', '.join(SECURITY_PROTOCOLS)}",
    )
    require(
        s.sasl_mechanism in SASL_MECHANISMS,
        "sasl_mechanism",
        f"must be one of {', '.join(m for m in SASL_MECHANISMS if m)}",
    )
    require(
        not s.security_protocol.startswith("SASL") or bool(s.sasl_mechanism),
        "sasl_mechanism",
        f"required with security_protocol={s.security_protocol}",
    )
    require(
        s.sasl_mechanism != "OAUTHBEARER" or bool(s.sasl_oauthbearer_token_endpoint_url),
        "sasl_oauthbearer_token_endpoint_url",
        "required with sasl_mechanism=OAUTHBEARER (client credentials at an OIDC provider)",
    )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(s, name)
        require(not path or Path(path).is_file(), name, f"file not found: {path}")
        require(not path or os.access(path, os.R_OK), name, f"cannot read {path}")
    require(
        bool(s.ssl_certfile) == bool(s.ssl_keyfile),
        "ssl_keyfile" if s.ssl_certfile else "ssl_certfile",
        "mutual TLS needs both ssl_certfile and ssl_keyfile",
    )
    require(
        math.isfinite(s.auth_failure_exit_s) and s.auth_failure_exit_s >= 0,
        "auth_failure_exit_s",
        "must be >= 0 (0: never exit)",
    )
    require(s.poll_timeout_ms >= 0, "poll_timeout_ms", "must be >= 0")
    require(s.max_poll_records >= 1, "max_poll_records", "must be >= 1")
    require(s.session_timeout_ms >= 1000, "session_timeout_ms", "must be >= 1000")
    require(s.produce_timeout_s > 0, "produce_timeout_s", "must be > 0")
    require(
        s.consumer_stall_timeout_s == 0 or s.consumer_stall_timeout_s >= 1,
        "consumer_stall_timeout_s",
        "must be >= 1 (0 turns the watchdog off)",
    )
    require(
        s.model_updates_topic not in outputs | set(s.input_topics),
        "model_updates_topic",
        "must differ from the input and output topics",
    )
    require(s.model_sync_interval_ms >= 10, "model_sync_interval_ms", "must be >= 10")
    require(
        math.isfinite(s.model_sync_hold_threshold) and 0 <= s.model_sync_hold_threshold <= 1,
        "model_sync_hold_threshold",
        "must be within [0, 1] (0: every increment goes at once)",
    )
    require(
        s.model_sync_interval_ms <= s.model_sync_max_hold_ms <= 0xFFFF * s.model_sync_interval_ms,
        "model_sync_max_hold_ms",
        "must be at least model_sync_interval_ms and at most 65,535 rounds",
    )
    require(
        s.model_sync_precision in MODEL_SYNC_PRECISIONS,
        "model_sync_precision",
        f"must be one of {', '.join(MODEL_SYNC_PRECISIONS)}",
    )
    require(s.max_event_bytes >= 64, "max_event_bytes", "must be >= 64")
    check_hashing(s.hash_bits, s.hash_seed, s.numeric_transform, s.max_features)
    require(
        math.isfinite(s.max_future_skew_s) and s.max_future_skew_s >= 0,
        "max_future_skew_s",
        "must be >= 0 (0 turns the check off)",
    )
    require(s.attribution_window_s > 0, "attribution_window_s", "must be > 0")
    require(
        s.label_policy in LABEL_POLICIES,
        "label_policy",
        f"must be one of {', '.join(LABEL_POLICIES)}",
    )
    require(s.max_pending_impressions >= 1, "max_pending_impressions", "must be >= 1")
    require(s.auc_window >= 10, "auc_window", "must be >= 10")
    require(bool(s.checkpoint_dir), "checkpoint_dir", "must not be empty")
    require(s.checkpoint_interval_s > 0, "checkpoint_interval_s", "must be > 0")
    require(s.checkpoint_every_events >= 1, "checkpoint_every_events", "must be >= 1")
    require(
        s.checkpoint_keep >= 2,
        "checkpoint_keep",
        "must be >= 2 so a corrupt newest file has a fallback",
    )
    require(0 <= s.metrics_port <= 65535, "metrics_port", "must be a port number")
    require(
        s.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log_level",
        "must be DEBUG, INFO, WARNING or ERROR",
    )
    require(
        s.model.n_buckets == 1 << s.hash_bits,
        "hash_bits",
        f"disagrees with n_buckets={s.model.n_buckets}",
    )


@dataclass(frozen=True, slots=True)
class SettingSpec:
    name: str
    kind: Any  # int, float, str, bool or tuple[str, ...]
    default: Any
    help: str
    in_model: bool


def _kind_of(annotation: Any) -> Any:
    if annotation in (int, float, str, bool):
        return annotation
    if typing.get_origin(annotation) is tuple:
        return tuple
    raise TypeError(f"unsupported setting type {annotation!r}")


def setting_specs() -> Iterator[SettingSpec]:
    """Every flat setting name with its type, default and help, model ones included."""
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        yield SettingSpec(
            f.name, _kind_of(hints[f.name]), default, f.metadata.get("help", ""), False
        )
    model_hints = typing.get_type_hints(FMParams)
    defaults = FMParams()
    for f in dataclasses.fields(FMParams):
        if f.name == "n_buckets":  # derived from hash_bits
            continue
        help_text = f.metadata.get("help", "FM hyperparameter")
        yield SettingSpec(
            f.name, _kind_of(model_hints[f.name]), getattr(defaults, f.name), help_text, True
        )


SPECS: Final = {spec.name: spec for spec in setting_specs()}

#: What shapes learning and evaluation, and so all that ``replay`` and ``bench`` read.
LEARNING_SETTINGS: Final = frozenset(
    {
        "max_event_bytes",
        "hash_bits",
        "hash_seed",
        "numeric_transform",
        "max_features",
        "attribution_window_s",
        "label_policy",
        "max_pending_impressions",
        "auc_window",
    }
    | {spec.name for spec in SPECS.values() if spec.in_model}
)


def _coerce(spec: SettingSpec, raw: Any, source: str) -> Any:
    """Turn a TOML value or a string (env, flag) into the setting's type."""
    kind = spec.kind
    try:
        if isinstance(raw, str) and kind is not str:
            text = raw.strip()
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            if kind is tuple:
                return tuple(part.strip() for part in text.split(",") if part.strip())
            return kind(text)
        if kind is tuple and isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
        if kind is float and type(raw) is int:
            return float(raw)
        if type(raw) is kind:
            return raw
        raise ValueError(f"expected {getattr(kind, '__name__', kind)}, got {type(raw).__name__}")
    except ValueError as error:
        raise ConfigError(spec.name, f"invalid value {raw!r} from {source}: {error}") from None


def load_settings(
    config_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the one ``Settings``: defaults < TOML < ``STREAM_FM_*`` < ``overrides`` (flags)."""
    chosen: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        try:
            document = tomllib.loads(path.read_text())
        except OSError as error:
            raise ConfigError("config", f"cannot read {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError("config", f"{path} is not valid TOML: {error}") from None
        for key, value in _flatten_toml(document):
            spec = SPECS.get(key)
            if spec is None:
                raise ConfigError(key, f"unknown setting (in {path})")
            chosen[key] = _coerce(spec, value, str(path))
    for var, text in (os.environ if env is None else env).items():
        if not var.startswith(ENV_PREFIX) or var in NON_SETTING_ENV:
            continue
        spec = SPECS.get(var[len(ENV_PREFIX) :].lower())
        if spec is None:
            raise ConfigError(var, "unknown setting (environment variable)")
        chosen[spec.name] = _coerce(spec, text, var)
    for key, value in (overrides or {}).items():
        spec = SPECS.get(key)
        if spec is None:
            raise ConfigError(key, "unknown setting")
        chosen[key] = _coerce(spec, value, "command line")
    return build_settings(chosen)


def build_settings(chosen: Mapping[str, Any]) -> Settings:
    """Settings from already-typed flat values (a test or the demo building its own)."""
    unknown = set(chosen) - set(SPECS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown setting")
    hash_bits = chosen.get("hash_bits", SPECS["hash_bits"].default)
    model_values = {k: v for k, v in chosen.items() if SPECS[k].in_model}
    try:
        model = FMParams(n_buckets=1 << int(hash_bits), **model_values)
    except TypeError as error:
        raise ConfigError("model", str(error)) from None
    top = {k: v for k, v in chosen.items() if not SPECS[k].in_model}
    for name in SECRETS:
        if top.get(name) and top.get(f"{name}_file"):
            raise ConfigError(f"{name}_file", f"give {name} or {name}_file, not both")
    settings = read_secret_files(Settings(model=model, **top))
    check_tls_files(settings)
    return settings


def check_tls_files(settings: Settings) -> None:
    """Load the CA bundle and the client key as the clients will, so a file that is not PEM
    or a wrong key password fails at start-up naming its setting, not at the first connect."""
    if not settings.security_protocol.endswith("SSL"):
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ssl_cafile:
        try:
            context.load_verify_locations(settings.ssl_cafile)
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(
                "ssl_cafile", f"{settings.ssl_cafile} holds no usable PEM certificate ({error})"
            ) from None
    if settings.ssl_certfile:
        try:
            context.load_cert_chain(
                settings.ssl_certfile, settings.ssl_keyfile, lambda: settings.ssl_key_password
            )
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(
                "ssl_keyfile",
                f"cannot load {settings.ssl_certfile} with {settings.ssl_keyfile}: not a "
                f"matching PEM certificate and key, or a wrong ssl_key_password ({error})",
            ) from None


#: Settings that are secrets: never shown, each may come from a file ``<name>_file``
#: (``STREAM_FM_<NAME>_FILE``, the convention of Docker and Kubernetes secrets).
SECRETS: Final = ("sasl_password", "ssl_key_password", "sasl_oauthbearer_client_secret")


def read_secret_files(settings: Settings) -> Settings:
    """``settings`` with each secret read from its ``*_file`` (again: after a refusal, a
    rotated Secret is picked up this way). One trailing newline is not part of the secret."""
    values: dict[str, Any] = {}
    for name in SECRETS:
        path = getattr(settings, f"{name}_file")
        if not path:
            continue
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise ConfigError(f"{name}_file", f"cannot read {path}: {reason}") from None
        values[name] = text[:-1] if text.endswith("\n") else text
        if not values[name]:
            raise ConfigError(f"{name}_file", f"{path} is empty")
    return dataclasses.replace(settings, **values) if values else settings


def _flatten_toml(document: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Accept both flat keys and one level of tables such as ``[kafka]`` or ``[model]``."""
    for key, value in document.items():
        if isinstance(value, dict):
            yield from value.items()
        else:
            yield key, value


def describe(settings: Settings) -> dict[str, Any]:
    """Flat name -> value, secrets masked: for the start-up log line."""
    out: dict[str, Any] = {}
    for spec in SPECS.values():
        owner: Any = settings.model if spec.in_model else settings
        value = getattr(owner, spec.name)
        out[spec.name] = "***" if spec.name in SECRETS and value else value
    return out
