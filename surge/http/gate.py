"""The request gate: what every request passes before any route sees it, in server and router.

A plain ASGI piece (no FastAPI), so the raw-ASGI router uses the same code as ``surge serve``:
the API key (401) on the paths that need one, then the body size (413, from Content-Length and
again while reading, so a chunked body cannot slip past). The body read here is handed to the
app again (``replay``), so the app reads it as if nothing had happened.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.http.auth import ApiKeyAuth, AuthError
from surge.http.errors import APIError, send_error, send_error_preencoded
from surge.http.unicode import json_lone_surrogate, surrogate_problem

__all__ = ["KEY_ID_STATE", "KEY_OWNER_STATE", "FastRefusals", "RequestGate", "check_text",
           "header", "key_id", "key_owner", "read_body", "replay", "too_large"]

# Where the gate leaves the caller's key id (``key0``, ...) in ``scope["state"]``, and the
# owner name of what the caller stores (``ApiKeyAuth.owner``).
KEY_ID_STATE = "surge_key_id"
KEY_OWNER_STATE = "surge_key_owner"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Told why a request was refused ("unauthorized", "body_too_large"), for metrics.
OnReject = Callable[[str], None]
# Asked after auth, before the body is read (``body`` None), and again once it is read, before
# anything parses it: an error refuses the request at once (overload: a 429 that costs no
# parsing, and no reading when the headers decide), None lets it through.
Shed = Callable[[Scope, "bytes | None"], "APIError | None"]


def _never_shed(scope: Scope, body: bytes | None) -> APIError | None:
    return None


def _ignore(reason: str) -> None:
    return None


class RequestGate:
    """ASGI middleware: ``auth`` on paths starting with ``auth_prefixes``, then the body
    limit on POST, PUT and PATCH."""

    def __init__(self, app: ASGIApp, *, auth: ApiKeyAuth, max_body_bytes: int,
                 auth_prefixes: tuple[str, ...], on_reject: OnReject = _ignore,
                 shed: Shed = _never_shed) -> None:
        self.app = app
        self.shed = shed
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.auth_prefixes = auth_prefixes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            if scope["path"].startswith(self.auth_prefixes):
                _note_caller(scope, self.auth, self._authenticate(scope))
            if (refusal := self.shed(scope, None)) is not None:
                raise refusal
            if scope["method"] in BODY_METHODS:
                body = await read_body(scope, receive, self.max_body_bytes, self.on_reject)
                if body is None:
                    return  # the client left while sending
                if (refusal := self.shed(scope, body)) is not None:
                    raise refusal
                check_text(scope, body)
                receive = replay(body, receive)
        except APIError as exc:
            return await send_error(send, exc)
        await self.app(scope, receive, send)

    def _authenticate(self, scope: Scope) -> str | None:
        try:
            return self.auth.authenticate(header(scope, b"authorization"))
        except AuthError as exc:
            self.on_reject("unauthorized")
            raise APIError(401, exc.message, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"}) from exc


class FastRefusals:
    """ASGI middleware outside everything else, for overload: while ``busy()`` says the
    server is full, a POST to one of ``paths`` that ``shed`` refuses gets its 429 here, from
    pre-encoded bytes, before request records, logging, routing or validation cost anything.
    Under a flood of clients that ignore Retry-After a refusal then costs little more than
    parsing its HTTP, and the engine keeps its CPU. Anything else passes on untouched (a body
    read here is replayed), so the gate inside still answers 401 and 400 as usual; a body
    over the limit gets the gate's 413 from here."""

    def __init__(self, app: ASGIApp, *, auth: ApiKeyAuth, max_body_bytes: int,
                 paths: Collection[str], busy: Callable[[], bool], shed: Shed,
                 on_reject: OnReject = _ignore) -> None:
        self.app = app
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.paths = frozenset(paths)
        self.busy = busy
        self.shed = shed
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] not in self.paths or not self.busy()
                or not self._authenticated(scope)):
            return await self.app(scope, receive, send)
        refusal = self.shed(scope, None)
        if refusal is None:
            try:
                body = await read_body(scope, receive, self.max_body_bytes, self.on_reject)
            except APIError as exc:  # too large: the 413 the gate would send
                return await send_error(send, exc)
            if body is None:
                return  # the client left while sending
            refusal = self.shed(scope, body)
            if refusal is None:
                return await self.app(scope, replay(body, receive), send)
        await send_error_preencoded(send, refusal)

    def _authenticated(self, scope: Scope) -> bool:
        """Whether the caller's key is good (or none is needed), leaving its id where the
        tenant is looked up; a bad key passes on, for the gate's 401."""
        try:
            key = self.auth.authenticate(header(scope, b"authorization"))
        except AuthError:
            return False
        _note_caller(scope, self.auth, key)
        return True


def _note_caller(scope: Scope, auth: ApiKeyAuth, key: str | None) -> None:
    """Leave the caller's key id and owner name where ``key_id`` and ``key_owner`` read them."""
    state = scope.setdefault("state", {})
    state[KEY_ID_STATE] = key
    state[KEY_OWNER_STATE] = auth.owner(key)


async def read_body(scope: Scope, receive: Receive, limit: int,
                    on_reject: OnReject = _ignore) -> bytes | None:
    """The whole request body, or None when the client hung up while sending it; raises
    413 as soon as the declared or received size passes ``limit``."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        on_reject("body_too_large")
        raise too_large(int(declared), limit, declared=True)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            on_reject("body_too_large")
            raise too_large(size, limit, declared=False)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_text(scope: Scope, body: bytes) -> None:
    """400 for a JSON body with a lone surrogate (``"\\ud800"``): valid JSON that no
    tokenizer, store or response encoder accepts, refused once here for every route."""
    content_type = (header(scope, b"content-type") or "").lower()
    if content_type.startswith(("multipart/", "application/x-www-form-urlencoded")):
        return  # forms: a batch upload names the bad line itself
    path = json_lone_surrogate(body)
    if path is not None:
        raise APIError(400, surrogate_problem(path), param=path or None,
                       code="invalid_unicode")


def too_large(size: int, limit: int, *, declared: bool) -> APIError:
    # A body cut off while reading is larger than what was read: say "at least".
    amount = f"{size}" if declared else f"at least {size}"
    return APIError(413, f"the request body has {amount} bytes: allowed is at most {limit} "
                    "(--max-body-bytes)", code="request_too_large")


def replay(body: bytes, receive: Receive) -> Receive:
    """Hand the already-read body to the app once, then pass through (disconnect events)."""
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def key_id(scope: Scope) -> str | None:
    """The caller's API key id that the gate found (None when auth is off)."""
    return scope.get("state", {}).get(KEY_ID_STATE)


def key_owner(scope: Scope) -> str:
    """Whose stored things the caller may see: a name derived from its API key, ``""`` when
    auth is off (then everything is one namespace)."""
    return scope.get("state", {}).get(KEY_OWNER_STATE) or ""
