"""One exception root for the package; each subclass names what failed."""

from __future__ import annotations


class StreamFMError(Exception):
    """Root of every error stream_fm raises on purpose."""


class ConfigError(StreamFMError):
    """A setting is unknown or invalid; the message starts with the setting's name."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class InvalidEvent(StreamFMError):
    """A record could not be turned into an event; `reason` is a short stable label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CheckpointError(StreamFMError):
    """A checkpoint could not be written or read."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file is truncated, fails its checksum or is malformed."""


class MissingCheckpoint(StreamFMError):
    """The consumer group has committed offsets but no checkpoint exists to restore."""


class BrokerError(StreamFMError):
    """Talking to Kafka failed (the broker launcher or the client)."""


class BrokerStartError(BrokerError):
    """The local Apache Kafka broker could not be started."""


class ProduceError(BrokerError):
    """A record could not be published and acknowledged.

    ``permanent``: the broker refused the record itself (too large, invalid, not authorized),
    so sending it again as it is fails again; otherwise the failure may pass (broker away,
    timeouts). ``topic`` and ``nbytes`` name the refused record where known.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        topic: str | None = None,
        nbytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.topic = topic
        self.nbytes = nbytes


class BadModelUpdate(StreamFMError):
    """A record of the model-updates topic that is not a usable update (corrupt, truncated, of
    another format version or of a model of another shape): it is skipped, never applied."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class ClusterRefused(BrokerError):
    """The cluster refused this worker: ``cause`` is authentication, certificate or
    authorization; the message names the setting or the ACL to fix."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"refused by the cluster ({cause}): {detail}")
        self.cause = cause
        self.detail = detail
