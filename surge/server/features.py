"""How optional features plug into `surge serve`: the batch API, the web apps and the
embedding and classification models each come as one ``FeaturePlugin``.

A plugin adds its command-line flags and, from the parsed flags, makes a ``Feature`` (or None
when it is off). A feature mounts itself on the app with what the server offers it, a
``ServerHost``: its routes on the app, its models in the served-models authority, its
background work in the services stack. Only ``surge.entrypoints.serve`` composes plugins;
``surge.server`` imports none of them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fastapi import FastAPI

from surge.http.control import ServerControl
from surge.http.services import Services
from surge.server.context import RequestContext
from surge.server.metrics import ServerMetrics
from surge.server.models import ServedModels

if TYPE_CHECKING:
    from surge.server.app import ServerSettings

__all__ = ["Feature", "FeaturePlugin", "ServerHost", "ServingLoad"]


class ServingLoad(Protocol):
    """The interactive load, for work that should yield to it (batch lines)."""

    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        ...

    def num_waiting_for_first_token(self, more_urgent_than: int) -> int:
        """Requests with a priority value below ``more_urgent_than`` and no first token."""
        ...

    def can_run(self) -> bool:
        """Whether a new request could run now (not draining, model loaded and healthy)."""
        ...


@dataclass(frozen=True)
class ServerHost:
    """What the server gives a feature when it mounts."""

    settings: ServerSettings
    models: ServedModels
    context: RequestContext
    metrics: ServerMetrics
    services: Services
    load: ServingLoad
    control: ServerControl


class Feature(Protocol):
    def mount(self, app: FastAPI, host: ServerHost) -> None:
        """Add routes, models and services; called once, before the app starts."""
        ...


class FeaturePlugin(Protocol):
    def add_args(self, parser: argparse.ArgumentParser) -> None: ...

    def from_args(self, args: argparse.Namespace, settings: ServerSettings,
                  model_dir: str) -> Feature | None:
        """The feature the flags ask for, or None when it is off. May adjust ``settings``
        (a feature that takes large bodies raises the body limit)."""
        ...
