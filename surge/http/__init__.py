"""The HTTP floor shared by the server, the router and the features on top of them.

- ``errors``: OpenAI's error model (``APIError``) and the SSE error event; ``handlers``
  installs it on a FastAPI app; ``openapi`` documents it.
- ``gate``: the request gate (API key, body limit, replay of the body), plain ASGI.
- ``auth``: API keys and per-key rate limits.
- ``responses``: JSON and SSE answers and the race against a client hanging up.
- ``server``: the uvicorn server with the drain hook; ``logs``: the logging set-up.
- ``services``: the background-services stack and ASGI's lifespan protocol.
- ``sqlite``: SQLite settings and write transactions for features that keep state.

Nothing here imports ``surge.server``, ``surge.engine`` or ``surge.router``.
"""
