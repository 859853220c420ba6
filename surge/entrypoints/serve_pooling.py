"""`surge serve` flags and set-up for embedding and image-classification models.

``--model`` may name any kind of model; its task is read from config.json, and the LLM engine
starts only for a model that generates. ``--extra-model [NAME=]PATH_OR_SHORTNAME`` (repeatable)
adds embedding or classification models to the same server, each behind its own dynamic
batcher, chosen by the request's ``model`` field.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from surge.batching.batcher import BatcherConfig
from surge.hub import resolve_model
from surge.models.tasks import detect_task

if TYPE_CHECKING:
    from surge.server.app import ServerSettings
    from surge.server.pooling import ModelPools, PoolingFeature, PoolModelSpec

__all__ = [
    "PoolingPlugin",
    "add_pooling_args",
    "main_model_generates",
    "pools_from_args",
    "resolve_model_arg",
]

logger = logging.getLogger("surge.serve")

# A base64 body is 4/3 of the image, plus the JSON around it.
_BASE64_OVERHEAD = 4 / 3
_JSON_MARGIN = 64 << 10


def add_pooling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "embedding and classification models (dynamic batching)")
    group.add_argument("--extra-model", action="append", default=[], metavar="[NAME=]MODEL",
                       help="also serve this embedding or image-classification model (a "
                            "checkpoint directory or a short name such as all-minilm-l6-v2); "
                            "NAME defaults to the short name or directory name; repeatable")
    group.add_argument("--max-batch-size", type=int, default=32,
                       help="most inputs per model call (default 32)")
    group.add_argument("--max-batch-wait-ms", type=float, default=5.0,
                       help="how long the first input of a batch waits for more (default 5)")
    group.add_argument("--preferred-batch-sizes", default=None, metavar="N[,N...]",
                       help="batch sizes that leave at once, before the wait ends")
    group.add_argument("--max-batch-queue", type=int, default=1024,
                       help="inputs waiting per model before new requests get 429 "
                            "(default 1024)")
    group.add_argument("--max-image-bytes", type=int, default=20 << 20,
                       help="largest image file accepted, else 413 (default 20 MiB)")
    group.add_argument("--max-image-pixels", type=int, default=40_000_000,
                       help="most pixels an image may declare, checked before decoding, "
                            "else 413 (default 40,000,000)")


class PoolingPlugin:
    """Embedding and classification models as a plug-in of ``surge serve``: the main model
    when it does not generate, and every ``--extra-model``."""

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_pooling_args(parser)

    def from_args(self, args: argparse.Namespace, settings: ServerSettings,
                  model_dir: str) -> PoolingFeature:
        """Always on: without such models, the routes say which models the server has."""
        from surge.server.pooling import ModelPools, PoolingFeature

        return PoolingFeature(pools_from_args(args, model_dir, settings) or ModelPools([]))


def resolve_model_arg(name: str) -> str:
    """--model's value as a directory: a path, or a short name of an installed package."""
    return str(resolve_model(name))


def main_model_generates(model_dir: str) -> bool:
    return detect_task(model_dir) == "generate"


def pools_from_args(args: argparse.Namespace, main_model_dir: str,
                    settings: ServerSettings) -> ModelPools | None:
    """The non-generative models to serve (None: none).

    Adjusts ``settings``: the body limit grows to fit one image as base64 when a classifier
    is served.
    """
    from surge.server.images import ImageLimits
    from surge.server.pooling import ModelPools, PoolModelSpec, PoolSettings

    specs: list[PoolModelSpec] = []
    if not main_model_generates(main_model_dir):
        name = settings.model_names[0]
        specs.append(PoolModelSpec(name, Path(main_model_dir), detect_task(main_model_dir)))
    specs += [_extra_spec(value) for value in args.extra_model]
    if not specs:
        return None
    pool_settings = PoolSettings(
        batcher=_batcher_config(args),
        image_limits=ImageLimits(args.max_image_bytes, args.max_image_pixels),
        dtype=args.dtype, device=args.device)
    if any(spec.task == "classify" for spec in specs):
        _fit_body_limit(settings, args.max_image_bytes)
    return ModelPools(specs, pool_settings)


def _extra_spec(value: str) -> PoolModelSpec:
    from surge.server.pooling import PoolModelSpec

    name, sep, model = value.partition("=")
    if not sep or Path(value).expanduser().exists():  # a path may contain "=" itself
        name, model = "", value
    if sep and not name:
        raise ValueError(f"--extra-model {value}: the name before '=' is empty: allowed is "
                         "NAME=MODEL or MODEL")
    model_dir = resolve_model(model)
    task = detect_task(model_dir)
    if task == "generate":
        raise ValueError(f"--extra-model {value}: {model_dir} is a text-generation model; "
                         "serve it as --model (one text-generation model per server)")
    return PoolModelSpec(name or _default_name(model, model_dir), model_dir, task)


def _default_name(model: str, model_dir: Path) -> str:
    return model if not Path(model).expanduser().exists() else model_dir.resolve().name


def _batcher_config(args: argparse.Namespace) -> BatcherConfig:
    preferred: tuple[int, ...] = ()
    if args.preferred_batch_sizes:
        try:
            preferred = tuple(int(v) for v in args.preferred_batch_sizes.split(","))
        except ValueError:
            raise ValueError(f"--preferred-batch-sizes={args.preferred_batch_sizes!r} is "
                             "invalid: allowed is comma-separated integers, e.g. 8,16,32"
                             ) from None
    try:
        return BatcherConfig(max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_batch_wait_ms,
                             preferred_batch_sizes=preferred,
                             max_queue_size=args.max_batch_queue)
    except ValueError as exc:  # name the flag, not the field
        flag = str(exc).split("=", 1)[0]
        flags = {"max_batch_size": "--max-batch-size", "max_wait_ms": "--max-batch-wait-ms",
                 "preferred_batch_sizes": "--preferred-batch-sizes",
                 "max_queue_size": "--max-batch-queue"}
        raise ValueError(str(exc).replace(flag, flags.get(flag, flag), 1)) from None


def _fit_body_limit(settings: ServerSettings, max_image_bytes: int) -> None:
    needed = int(max_image_bytes * _BASE64_OVERHEAD) + _JSON_MARGIN
    if settings.max_body_bytes < needed:
        logger.info("--max-body-bytes raised from %d to %d so that one image of "
                    "--max-image-bytes fits as base64", settings.max_body_bytes, needed)
        settings.max_body_bytes = needed
