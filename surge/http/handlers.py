"""FastAPI's error handling in OpenAI's shape: our ``APIError``, request validation (422
becomes 400 naming the field), unknown routes and methods, and unexpected failures.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from surge.http.errors import APIError, error_response, validation_message

__all__ = ["install_error_handlers"]

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)


async def _handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(exc.errors())
    return error_response(APIError(400, message, param=param, code="invalid_value"))


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"{request.method} {request.url.path} does not exist: see GET /docs"
    elif exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers["Allow"] = ", ".join(allowed)
        message = (f"{request.method} is not allowed on {request.url.path}: allowed is "
                   f"{', '.join(allowed)}")
    return error_response(APIError(exc.status_code, message, headers=headers))


_HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own Allow header names only
    the first route whose path matched, so ``GET`` and ``DELETE /v1/files/{id}`` (two routes)
    would answer ``Allow: GET``. Asking the routes (included routers too) with each method
    needs no knowledge of how they are nested."""
    routes = request.app.router.routes
    return [method for method in _HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL
                   for route in routes)]


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return error_response(APIError(500, f"internal server error: {type(exc).__name__}",
                                   code="internal_error"))
