"""One model per consumer group: workers exchange what they learn through a Kafka topic.

- ``wire``: the model-updates record format (binary, versioned, checksummed);
- ``peers``: ``ModelSync``, a worker's publishing of its learning and applying of its peers';
- ``metrics``: the model-sync metrics.

The increments themselves and how a peer's are added are ``stream_fm.model.delta``'s.
"""

from stream_fm.sync.peers import ModelSync, ensure_topic

__all__ = ["ModelSync", "ensure_topic"]
