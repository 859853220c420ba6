"""The stages as a feature of the server: the pipeline becomes the request context's
``stages``, its metrics join the server's registry, and each stage's ``setup`` gets the
server (its served models, embeddings through their batcher)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import numpy as np
from fastapi import FastAPI

from surge.server.features import ServerHost
from surge.stages.loader import StageSpec
from surge.stages.pipeline import LoadedStage, StageMetrics, StagePipeline

__all__ = ["ServerStageHost", "StagesFeature", "loaded_stages"]


class ServerStageHost:
    """A ``surge.stages.api.StageHost`` over the server a feature mounts on."""

    def __init__(self, host: ServerHost) -> None:
        self._host = host

    def served_models(self, task: str) -> list[str]:
        return self._host.models.names(task)  # type: ignore[arg-type]

    async def embed(self, model: str, texts: Sequence[str]) -> list[np.ndarray]:
        target = self._host.models.resolve(model, "embed").target
        return await target.embed_texts(list(texts), self._host.context.deadline())


def loaded_stages(specs: Sequence[StageSpec]) -> list[LoadedStage]:
    """Each spec as a named stage; a name given twice gets '#2', '#3' (metrics labels)."""
    stages: list[LoadedStage] = []
    seen: dict[str, int] = {}
    for spec in specs:
        seen[spec.name] = seen.get(spec.name, 0) + 1
        name = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
        stages.append(LoadedStage(name, spec.stage))
    return stages


class StagesFeature:
    def __init__(self, specs: Sequence[StageSpec]) -> None:
        self.stages = loaded_stages(specs)
        self.pipeline: StagePipeline | None = None

    def mount(self, app: FastAPI, host: ServerHost) -> None:
        stage_host = ServerStageHost(host)
        for stage in self.stages:
            setup = getattr(stage.obj, "setup", None)
            if callable(setup):
                try:
                    setup(stage_host)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"the request stage {stage.name!r} cannot run on this "
                                     f"server: {exc}") from exc
        pipeline = StagePipeline(self.stages, StageMetrics(host.metrics.registry, self.stages),
                                 host.context.stage_observers)
        self.pipeline = pipeline
        host.context.stages = pipeline
        host.services.add(lambda: _closing(pipeline))


@contextlib.asynccontextmanager
async def _closing(pipeline: StagePipeline) -> AsyncIterator[None]:
    try:
        yield
    finally:
        pipeline.close()
