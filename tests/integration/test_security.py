"""A secured cluster the way managed Kafka runs it: every way in works with exactly the ACLs
docs/operations.md lists, and every refusal is named — in /readyz, in one log line, and by
exit code 3 — with nothing committed and no secret shown anywhere.

The broker (``SecuredBroker``) has SASL_SSL (SCRAM-SHA-256/512, PLAIN), SASL_PLAINTEXT, mutual
TLS and the StandardAuthorizer denying what no ACL allows; the harness uses its PLAINTEXT
operator listener. Workers are real ``stream-fm run`` processes, secrets given as files.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_fm.config import build_settings
from stream_fm.errors import BrokerStartError
from stream_fm.kafka.acls import AclNeed, required_acls
from stream_fm.kafka.admin import TopicReader, committed_offsets, read_topic
from stream_fm.tools.bench.kafka.processes import WorkerProcess
from stream_fm.tools.broker.secure import SecuredBroker
from stream_fm.tools.broker.tls import CertificateAuthority
from tests.integration.kafka_helpers import produce

pytestmark = pytest.mark.usefixtures("kafka_client")

N_IMPRESSIONS = 300
GIVE_UP_S = 5.0  # auth_failure_exit_s in the refusal tests


@pytest.fixture(scope="module")
def secured() -> Iterator[SecuredBroker]:
    broker = SecuredBroker(users=("worker", "noacl"))
    try:
        broker.start()
    except BrokerStartError as exc:
        broker.close()
        pytest.fail(f"cannot start the secured Apache Kafka broker: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.close()


class Setup:
    """Topics with impressions in them, the worker's settings as files and variables."""

    def __init__(self, broker: SecuredBroker, work: Path, client: str) -> None:
        self.broker, self.work, self.client = broker, work, client
        u = uuid.uuid4().hex[:8]
        self.topics = {"input": f"in-{u}", "predictions": f"pred-{u}", "dead_letters": f"dlq-{u}"}
        self.group = f"group-{u}"
        broker.create_topics([self.topics["input"], self.topics["predictions"]], partitions=2)
        broker.create_topics([self.topics["dead_letters"]], partitions=1)
        self.secrets: list[str] = []
        self.produced = 0
        self.produce_more(N_IMPRESSIONS)

    def produce_more(self, n: int) -> None:
        events = [
            {"type": "impression", "id": f"imp-{self.group}-{i}", "ts": 1_700_000_000_000 + i,
             "features": {"site": str(i % 7), "ad": str(i % 11)}}
            for i in range(self.produced, self.produced + n)
        ]  # fmt: skip
        self.produced += n
        records = [(e["id"].encode(), orjson.dumps(e)) for e in events]
        produce(self.broker, self.topics["input"], records)

    def env(
        self, protocol: str, mechanism: str = "", user: str = "worker", **over: Any
    ) -> dict[str, str]:
        """STREAM_FM_* for a worker connecting as ``user``; secrets go in files (0600)."""
        values = self.broker.client_settings(protocol, mechanism, user) | over
        env: dict[str, str] = {}
        for name, value in values.items():
            if name in ("sasl_password", "ssl_key_password"):
                self.secrets.append(str(value))
                path = self.work / f"{name}-{uuid.uuid4().hex[:6]}"
                path.write_text(f"{value}\n")
                path.chmod(0o600)
                env[f"STREAM_FM_{name.upper()}_FILE"] = str(path)
            else:
                env[f"STREAM_FM_{name.upper()}"] = str(value)
        env["STREAM_FM_AUTH_FAILURE_EXIT_S"] = str(over.get("auth_failure_exit_s", GIVE_UP_S))
        env["STREAM_FM_APPLY_LOG_PATH"] = str(self.work / "apply.jsonl")
        env["STREAM_FM_LOG_LEVEL"] = "INFO"
        return env

    def needs(self, env: dict[str, str]) -> list[AclNeed]:
        """The ACLs docs/operations.md lists for this worker's settings."""
        features = {
            name: env[f"STREAM_FM_{name.upper()}"]
            for name in ("transactional_id", "model_updates_topic")
            if f"STREAM_FM_{name.upper()}" in env
        }
        return required_acls(
            build_settings(
                {
                    "group_id": self.group,
                    "input_topics": (self.topics["input"],),
                    "predictions_topic": self.topics["predictions"],
                    "dead_letter_topic": self.topics["dead_letters"],
                    **features,
                }
            )
        )

    def worker(self, env: dict[str, str], name: str = "worker") -> WorkerProcess:
        return WorkerProcess(
            env.pop("STREAM_FM_BOOTSTRAP_SERVERS"),
            {**self.topics, "labels": ""},
            self.work,
            name,
            attribution_window_s=60.0,
            group_id=self.group,
            kafka_client=self.client,
            extra_env=env,
        )


@pytest.fixture
def setup(secured: SecuredBroker, tmp_path: Path, kafka_client: str) -> Setup:
    return Setup(secured, tmp_path, kafka_client)


def _readyz(worker: WorkerProcess, page: str = "/readyz") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(worker.url + page, timeout=2) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def _wait_predictions(setup: Setup, worker: WorkerProcess, timeout_s: float = 90.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_topic(setup.broker.bootstrap_servers, setup.topics["predictions"], 10)
        if len(records) >= N_IMPRESSIONS:
            return records
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{len(records)} of {N_IMPRESSIONS} predictions; worker log:\n"
                + worker.log_tail(40)
            )
        time.sleep(0.5)


WAYS_IN = [
    ("SASL_SSL", "SCRAM-SHA-256"),
    ("SASL_SSL", "SCRAM-SHA-512"),
    ("SASL_SSL", "PLAIN"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-512"),
    ("SSL", ""),  # mutual TLS, the client key encrypted
]


@pytest.mark.parametrize(("protocol", "mechanism"), WAYS_IN, ids=[f"{p}-{m}" for p, m in WAYS_IN])
def test_every_way_in_with_the_listed_acls_predicts_each_impression_once(
    setup: Setup, protocol: str, mechanism: str
) -> None:
    env = setup.env(protocol, mechanism)
    setup.broker.grant("worker", setup.needs(env))
    # One record that is not an event: a dead letter, whose headers are searched too.
    produce(setup.broker, setup.topics["input"], [(b"bad", b"{not json")])
    worker = setup.worker(env)
    try:
        records = _wait_predictions(setup, worker)
        pages = {page: _readyz(worker, page)[1].encode() for page in ("/metrics", "/readyz")}
    finally:
        code = worker.stop()
    assert code == 0, _tail(worker.log_path.read_text(errors="replace"))
    assert set(Counter(r.key for r in records).values()) == {1}
    committed = committed_offsets(
        setup.broker.bootstrap_servers, setup.group, setup.topics["input"]
    )
    assert sum(o or 0 for o in committed.values()) == N_IMPRESSIONS + 1
    assert len(read_topic(setup.broker.bootstrap_servers, setup.topics["dead_letters"], 10)) == 1
    assert b"stream_fm_events_total" in pages["/metrics"]
    _assert_no_secret(setup, worker, pages)


def test_an_expired_broker_certificate_is_named(tmp_path: Path, kafka_client: str) -> None:
    with SecuredBroker(users=("worker",), expired_cert=True) as broker:
        setup = Setup(broker, tmp_path, kafka_client)
        env = setup.env("SASL_SSL", "SCRAM-SHA-512")
        broker.grant("worker", setup.needs(env))
        worker = setup.worker(env)
        try:
            code = worker.process.wait(timeout=180)
        finally:
            worker.stop()
        log = worker.log_path.read_text(errors="replace")
        assert code == 3, _tail(log)
        assert (
            "giving up: refused by the cluster (certificate): the broker's certificate has "
            "expired" in log
        ), _tail(log)


def test_one_model_per_group_needs_no_create_acl_when_the_updates_topic_exists(
    setup: Setup,
) -> None:
    updates = f"updates-{setup.group}"
    setup.broker.create_topics([updates], partitions=1)
    env = setup.env("SASL_SSL", "SCRAM-SHA-512", model_updates_topic=updates)
    needs = [n for n in setup.needs(env) if not n.optional]  # no CREATE, no DESCRIBE_CONFIGS
    assert {(n.resource, n.name, n.operation) for n in needs} >= {("TOPIC", updates, "WRITE")}
    setup.broker.grant("worker", needs)
    worker = setup.worker(env)
    try:
        _wait_predictions(setup, worker)
    finally:
        code = worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert code == 0, _tail(log)
    assert f"model updates go through the existing topic {updates}" in log
    assert "cannot read max.message.bytes" in log  # the optional ACL's fallback, said once
    assert read_topic(setup.broker.bootstrap_servers, updates, 10), "no model update published"


def _assert_no_secret(
    setup: Setup, worker: WorkerProcess, pages: dict[str, bytes] | None = None
) -> None:
    """No secret in the log (describe() included), /metrics, /readyz, the checkpoints, the
    apply log or any output record (dead-letter headers included)."""
    places: dict[str, bytes] = {"log": worker.log_path.read_bytes(), **(pages or {})}
    for path in [*worker.checkpoint_dir.rglob("*"), setup.work / "apply.jsonl"]:
        if path.is_file():
            places[str(path)] = path.read_bytes()
    for topic in setup.topics.values():
        for r in read_topic(setup.broker.bootstrap_servers, topic, 10):
            headers = b"".join(k.encode() + (v or b"") for k, v in r.headers)
            places[f"{topic}@{r.offset}"] = (r.key or b"") + (r.value or b"") + headers
    for secret in setup.secrets:
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"a secret shows in {leaks}"


def _tail(log: str, n: int = 30) -> str:
    return "\n".join(line for line in log.splitlines()[-n:] if not line.startswith("%7"))


def _other_ca(setup: Setup) -> CertificateAuthority:
    return CertificateAuthority.create(setup.work / "other-ca", "other-ca")


REFUSALS: dict[str, tuple[str, str, str, str]] = {
    # case: (protocol, mechanism, what /readyz and the log must say)
    "wrong-password": ("SASL_SSL", "SCRAM-SHA-512", "authentication", "sasl_password_file"),
    "unknown-user": ("SASL_SSL", "SCRAM-SHA-256", "authentication", "sasl_username='ghost'"),
    "untrusted-broker": ("SASL_SSL", "SCRAM-SHA-512", "certificate", "not signed by a CA in ssl_cafile"),
    "hostname-mismatch": ("SASL_SSL", "SCRAM-SHA-512", "certificate", "not issued for the host"),
    "untrusted-client-cert": ("SSL", "", "certificate", "refused the client certificate"),
    "expired-client-cert": ("SSL", "", "certificate", "refused the client certificate"),
    "no-group-acl": ("SASL_SSL", "SCRAM-SHA-512", "authorization", "ACL GROUP"),
    "no-input-read-acl": ("SASL_SSL", "SCRAM-SHA-512", "authorization", "READ"),
    "no-output-write-acl": ("SASL_SSL", "PLAIN", "authorization", "WRITE"),
    "no-transactional-id-acl": ("SASL_SSL", "SCRAM-SHA-512", "authorization", "TRANSACTIONAL_ID"),
}  # fmt: skip


def _refused_env(setup: Setup, case: str) -> dict[str, str]:
    protocol, mechanism, _, _ = REFUSALS[case]
    env = setup.env(protocol, mechanism)
    if case == "no-transactional-id-acl":
        env["STREAM_FM_TRANSACTIONAL_ID"] = f"tx-{uuid.uuid4().hex[:8]}"
    needs = setup.needs(env)
    drop = {
        "no-group-acl": ("GROUP", "READ"),
        "no-input-read-acl": ("TOPIC", "READ"),
        "no-output-write-acl": ("TOPIC", "WRITE"),
        "no-transactional-id-acl": ("TRANSACTIONAL_ID", "WRITE"),
    }.get(case)
    setup.broker.grant("worker", [n for n in needs if (n.resource, n.operation) != drop])
    if case == "wrong-password":
        Path(env["STREAM_FM_SASL_PASSWORD_FILE"]).write_text("not-the-password\n")
    elif case == "unknown-user":
        env["STREAM_FM_SASL_USERNAME"] = "ghost"
    elif case == "untrusted-broker":
        env["STREAM_FM_SSL_CAFILE"] = str(_other_ca(setup).cert_path)
    elif case == "hostname-mismatch":
        env["STREAM_FM_BOOTSTRAP_SERVERS"] = env["STREAM_FM_BOOTSTRAP_SERVERS"].replace(
            "127.0.0.1", "localhost"
        )
    elif case in ("untrusted-client-cert", "expired-client-cert"):
        issuer = _other_ca(setup) if case == "untrusted-client-cert" else setup.broker.ca
        cert = issuer.issue(f"worker-{case}", expired=case == "expired-client-cert")
        env["STREAM_FM_SSL_CERTFILE"], env["STREAM_FM_SSL_KEYFILE"] = str(cert.cert), str(cert.key)
        env.pop("STREAM_FM_SSL_KEY_PASSWORD_FILE")
    return env


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_is_named_in_readyz_and_the_log_and_ends_the_worker_with_code_3(
    setup: Setup, case: str
) -> None:
    _, _, cause, phrase = REFUSALS[case]
    worker = setup.worker(_refused_env(setup, case))
    said, deadline = "", time.monotonic() + 60
    try:
        while worker.process.poll() is None and time.monotonic() < deadline:
            status, body = _readyz(worker)
            if status == 503 and "refused by the cluster" in body:
                said = body
                break
            time.sleep(0.25)
        code = worker.process.wait(timeout=120)
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert f"refused by the cluster ({cause})" in said and phrase in said, (said, _tail(log))
    assert code == 3, _tail(log)
    assert f"giving up: refused by the cluster ({cause})" in log
    committed = committed_offsets(
        setup.broker.bootstrap_servers, setup.group, setup.topics["input"]
    )
    # At most a new partition's starting offset (0): nothing was delivered, so none moved.
    assert all(not o for o in committed.values()), f"a refused worker committed {committed}"
    assert not read_topic(setup.broker.bootstrap_servers, setup.topics["predictions"], 10)
    _assert_no_secret(setup, worker)


def _committed_ids(broker: SecuredBroker, topic: str) -> list[bytes]:
    with TopicReader(broker.bootstrap_servers, isolation_level="read_committed") as reader:
        return [r.key or b"" for r in reader.read(topic, timeout_s=10)]


def test_a_scram_password_rotated_while_running_is_picked_up_nothing_lost_or_doubled(
    tmp_path: Path, kafka_client: str
) -> None:
    """The password changes on the broker, then in the mounted file, while the worker runs.
    Sessions must log in again every 3 s (``connections.max.reauth.ms``, as managed clusters
    do), so the old password is refused within seconds; the worker reads the file again, logs
    in with the new one and goes on. With transactions, read_committed readers see every
    impression exactly once."""
    reauth = {"connections.max.reauth.ms": "3000"}
    with SecuredBroker(users=("worker",), extra_properties=reauth) as broker:
        setup = Setup(broker, tmp_path, kafka_client)  # the first half of the impressions
        env = setup.env("SASL_SSL", "SCRAM-SHA-512", transactional_id=f"tx-{uuid.uuid4().hex[:6]}")
        env["STREAM_FM_AUTH_FAILURE_EXIT_S"] = "300"
        env["STREAM_FM_CHECKPOINT_INTERVAL_S"] = "2"
        broker.grant("worker", setup.needs(env))
        worker = setup.worker(env)
        try:
            _wait_committed(setup, worker, N_IMPRESSIONS)
            new_password = f"rotated-{uuid.uuid4().hex}"
            setup.secrets.append(new_password)
            broker.set_password("worker", new_password)
            time.sleep(8)  # the Secret reaches the pod later than the broker changes
            Path(env["STREAM_FM_SASL_PASSWORD_FILE"]).write_text(new_password + "\n")
            setup.produce_more(N_IMPRESSIONS)
            ids = _wait_committed(setup, worker, 2 * N_IMPRESSIONS)
        finally:
            code = worker.stop()
        log = worker.log_path.read_text(errors="replace")
        assert code == 0, _tail(log)
        assert "the secret files changed" in log, _tail(log)
        assert len(ids) == len(set(ids)) == 2 * N_IMPRESSIONS, "lost or doubled predictions"
        _assert_no_secret(setup, worker)


def _wait_committed(setup: Setup, worker: WorkerProcess, n: int) -> list[bytes]:
    deadline = time.monotonic() + 180
    while True:
        ids = _committed_ids(setup.broker, setup.topics["predictions"])
        if len(set(ids)) >= n:
            time.sleep(2)  # a duplicate would come with the records after
            return _committed_ids(setup.broker, setup.topics["predictions"])
        if worker.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{len(set(ids))} of {n} committed predictions; worker log:\n"
                + _tail(worker.log_path.read_text(errors="replace"), 60)
            )
        time.sleep(0.5)
