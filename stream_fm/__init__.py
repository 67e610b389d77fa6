"""stream_fm: streaming click prediction with a Factorization Machine over Kafka."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
