"""The OpenAI-compatible HTTP server (`surge serve`): app, schemas, serving, policies."""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationModel", "ServerSettings", "build_app"]


def __getattr__(name: str) -> Any:
    # The app pulls in FastAPI; the policy modules (admission, auth, metrics) should not.
    if name in __all__:
        from surge.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'surge.server' has no attribute {name!r}")
