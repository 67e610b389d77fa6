"""The model-sync metrics, on the worker's registry (created only when sync is on)."""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from stream_fm.sync.wire import REJECT_REASONS

#: A peer silent this long is dropped from the per-peer lag (writer names change at restarts;
#: a worker stopped by SIGTERM says so and is dropped at once).
PEER_FORGET_S = 900.0


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.published = Counter(
            "stream_fm_model_updates_published",
            "Model-update records this worker published (an update split in parts counts each).",
            registry=r,
        )
        self.applied = Counter(
            "stream_fm_model_updates_applied",
            "Peers' model-update records added to this worker's model.",
            registry=r,
        )
        self.rejected = Counter(
            "stream_fm_model_updates_rejected",
            "Records of the model-updates topic skipped, by reason (corrupt, other model shape).",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self.update_bytes = Counter(
            "stream_fm_model_update_bytes",
            "Bytes of model updates, published by this worker or applied from peers.",
            ["direction"],
            registry=r,
        )
        for direction in ("published", "applied"):
            self.update_bytes.labels(direction=direction)
        self.lag = Gauge(
            "stream_fm_model_sync_lag_seconds",
            "Age of the newest update applied from each peer (its publish time to now).",
            ["peer"],
            registry=r,
        )
        self.probe = Gauge(
            "stream_fm_model_probe_p",
            "p of a fixed probe example: workers of one group serving one model agree on it.",
            registry=r,
        )
        self.waiting = Gauge(
            "stream_fm_model_sync_waiting_buckets",
            "Buckets whose small increments wait to go out with later ones "
            "(model_sync_hold_threshold); a checkpoint sends them all.",
            registry=r,
        )
        self._newest: dict[str, float] = {}  # peer -> publish time of its newest applied update

    def peer_update(self, peer: str, published_at_s: float) -> None:
        self._newest[peer] = max(self._newest.get(peer, 0.0), published_at_s)

    def forget(self, peer: str) -> None:
        self._newest.pop(peer, None)
        with contextlib.suppress(KeyError):
            self.lag.remove(peer)

    def refresh_lag(self, now_s: float | None = None) -> None:
        now = time.time() if now_s is None else now_s
        for peer, at in list(self._newest.items()):
            if now - at > PEER_FORGET_S:
                self.forget(peer)
            else:
                self.lag.labels(peer=peer).set(max(now - at, 0.0))
