"""The ``--batch-*`` flags of ``surge serve`` and where batch data lives by default.

Kept free of heavy imports: building the CLI parser must stay fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surge.batch.queue import AmqpQueue, open_queue
from surge.config import DATA_DIR_ENV, user_data_dir

if TYPE_CHECKING:
    from surge.batch.routes import BatchFeature

__all__ = [
    "DATA_DIR_ENV",
    "BatchPlugin",
    "BatchSettings",
    "add_batch_args",
    "batch_settings_from_args",
    "default_data_dir",
]



@dataclass
class BatchSettings:
    """The ``--batch-*`` flags; None means the default under the data folder."""

    enabled: bool = True
    data_dir: str | None = None
    queue_url: str | None = None
    concurrency: int = 4

    def __post_init__(self) -> None:
        if self.concurrency < 0:
            raise ValueError(f"--batch-concurrency={self.concurrency} is invalid: allowed is "
                             "an integer >= 0 (0: only `surge batch worker` processes work)")

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def resolved_queue_url(self) -> str:
        return self.queue_url or f"sqlite://{self.resolved_data_dir() / 'queue.db'}"


def default_data_dir() -> Path:
    """``$SURGE_DATA_DIR/batch``, else the user's data folder (``~/.local/share/surge``)."""
    return user_data_dir() / "batch"


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batch API (/v1/files, /v1/batches)")
    group.add_argument("--no-batch", dest="batch_enabled", action="store_false",
                       help="disable the Files and Batches API")
    group.add_argument("--batch-data-dir", default=None, metavar="DIR",
                       help=f"where batch files, results and state live (default "
                            f"${DATA_DIR_ENV}/batch or ~/.local/share/surge/batch)")
    group.add_argument("--batch-queue-url", default=None, metavar="URL",
                       help="sqlite:///path/queue.db (default: in the data dir) or "
                            "amqp://user:pass@host:5672/?queue=NAME (RabbitMQ)")
    group.add_argument("--batch-concurrency", type=int, default=4, metavar="N",
                       help="batch lines this server runs at once, fewer under interactive "
                            "load (default 4; 0: only `surge batch worker` processes work)")


def batch_settings_from_args(args: argparse.Namespace) -> BatchSettings:
    settings = BatchSettings(enabled=args.batch_enabled, data_dir=args.batch_data_dir,
                             queue_url=args.batch_queue_url, concurrency=args.batch_concurrency)
    if settings.enabled:
        queue = open_queue(settings.resolved_queue_url())  # a bad URL fails before it starts
        if settings.concurrency == 0 and not isinstance(queue, AmqpQueue):
            raise ValueError("--batch-concurrency 0 needs --batch-queue-url amqp://...: with "
                             "the SQLite queue no other process would run the lines")
    return settings


class BatchPlugin:
    """The Files and Batches API as a plug-in of ``surge serve``: on unless ``--no-batch``."""

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_batch_args(parser)

    def from_args(self, args: argparse.Namespace, settings: Any,
                  model_dir: str) -> BatchFeature | None:
        batch = batch_settings_from_args(args)
        if not batch.enabled:
            return None
        from surge.batch.routes import BatchFeature  # FastAPI and the queue: only when on

        return BatchFeature(batch)
