"""Who a request belongs to, for "your own history": an anonymous user id.

A browser gets a random id in a cookie on its first visit (HttpOnly, so page scripts cannot
read it; SameSite=Lax, so other sites cannot send requests as this user). API clients may send
``X-User-ID`` instead. The id is a bearer secret: whoever presents it sees that user's history,
so ids we issue are 128 random bits.
"""

from __future__ import annotations

import re
import secrets
from http.cookies import SimpleCookie

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.http.auth import ApiKeyAuth, AuthError
from surge.http.errors import APIError, error_response

__all__ = ["COOKIE_NAME", "USER_HEADER", "ApiKeyGuard", "UserIdentity", "user_id"]

COOKIE_NAME = "surge_uid"
USER_HEADER = "x-user-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_COOKIE_MAX_AGE = 365 * 24 * 3600
_STATE_KEY = "surge_user_id"


class UserIdentity:
    """Pure ASGI middleware: gives requests under ``prefixes`` a user id (header, cookie, or a
    new one that is set as a cookie on the response)."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...], exact: tuple[str, ...]) -> None:
        self.app = app
        self.prefixes = prefixes
        self.exact = exact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path in self.exact or path.startswith(self.prefixes)):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        try:
            given = _given_id(headers)
        except APIError as exc:
            return await error_response(exc)(scope, receive, send)
        user = given or secrets.token_urlsafe(16)
        scope.setdefault("state", {})[_STATE_KEY] = user
        if given is None:
            send = _with_cookie(send, user)
        await self.app(scope, receive, send)


def _given_id(headers: dict[bytes, bytes]) -> str | None:
    header = headers.get(USER_HEADER.encode())
    if header is not None:
        value = header.decode("latin-1")
        if not _VALID_ID.match(value):
            raise APIError(400, "the X-User-ID header is invalid: allowed are 8 to 128 "
                           "letters, digits, '-' or '_'", param="X-User-ID",
                           code="invalid_user_id")
        return value
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:
        return None  # a malformed Cookie header: treat the visitor as new
    morsel = cookie.get(COOKIE_NAME)
    return morsel.value if morsel and _VALID_ID.match(morsel.value) else None


def _with_cookie(send: Send, user: str) -> Send:
    cookie = (f"{COOKIE_NAME}={user}; Path=/; Max-Age={_COOKIE_MAX_AGE}; HttpOnly; "
              "SameSite=Lax").encode()

    async def send_with_cookie(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (b"set-cookie", cookie)]}
        await send(message)

    return send_with_cookie


def user_id(request: Request) -> str:
    """The request's user id (set by ``UserIdentity``); a FastAPI dependency."""
    user = request.scope.get("state", {}).get(_STATE_KEY)
    if user is None:
        raise RuntimeError("UserIdentity middleware is not installed on this app")
    return user


class ApiKeyGuard:
    """A FastAPI dependency: when the server has API keys, the apps' endpoints need one too
    (the same ``Authorization: Bearer`` header the /v1 routes take)."""

    def __init__(self, keys: list[str]) -> None:
        self._auth = ApiKeyAuth(keys)

    @property
    def enabled(self) -> bool:
        return self._auth.enabled

    def __call__(self, request: Request) -> None:
        try:
            self._auth.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            raise APIError(401, f"{exc.message} This server needs an API key: send "
                           "'Authorization: Bearer KEY'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"}) from exc
