"""``POST /debug/profile`` (``--enable-profiler``): a torch.profiler trace of the engine's next
steps, recorded in the engine's own process, returned as a Chrome trace JSON file.

Behind the API key like the ``/v1`` routes. Body (all optional): ``{"num_steps": 10,
"max_seconds": 30}``; the engine records its next ``num_steps`` steps, or what it ran within
``max_seconds`` if it is idle meanwhile. One profile at a time (409 otherwise).
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from surge.engine.client import EngineClient, EngineDeadError
from surge.http.errors import APIError
from surge.http.openapi import error_responses

__all__ = ["ProfileRequest", "add_profile_route"]


class ProfileRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_steps: int = Field(10, ge=1, le=10_000, description="engine steps to record")
    max_seconds: float = Field(30.0, gt=0, le=600,
                               description="stop after this long even if fewer steps ran")


def add_profile_route(app: FastAPI, engine: EngineClient) -> None:
    @app.post("/debug/profile", tags=["operations"], response_class=Response,
              responses={200: {"content": {"application/json": {}},
                               "description": "a Chrome trace (chrome://tracing, Perfetto)"},
                         **error_responses({400: "invalid num_steps or max_seconds",
                                            401: "missing or wrong API key",
                                            409: "a profile is already being recorded",
                                            503: "the engine is not running"})})
    async def profile(body: ProfileRequest | None = None) -> Response:
        """Record the engine's next steps with torch.profiler."""
        body = body or ProfileRequest()
        try:
            result = await engine.profile(body.num_steps, body.max_seconds)
        except ValueError as exc:
            raise APIError(409, str(exc), code="profile_in_progress") from exc
        except EngineDeadError as exc:
            raise APIError(503, f"the engine cannot be profiled now: {exc}",
                           code="engine_unavailable", headers={"Retry-After": "1"}) from exc
        if result.error is not None:
            raise APIError(409, result.error, code="profile_in_progress")
        return Response(result.trace, media_type="application/json", headers={
            "Content-Disposition": 'attachment; filename="surge-profile.json"',
            "X-Surge-Profile-Steps": str(result.num_steps)})
