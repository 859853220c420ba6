"""Dynamic batching for one-shot models (embeddings, classification): see ``batcher``."""

from surge.batching.batcher import (
    BatcherClosed,
    BatcherConfig,
    BatcherFull,
    BatchObserver,
    BatchTimeout,
    DynamicBatcher,
)
from surge.batching.metrics import BatchMetrics

__all__ = [
    "BatchMetrics",
    "BatchObserver",
    "BatchTimeout",
    "BatcherClosed",
    "BatcherConfig",
    "BatcherFull",
    "DynamicBatcher",
]
