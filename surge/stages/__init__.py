"""Request stages: code in the request path of /v1/chat/completions and /v1/completions.

A pre-stage sees a request before admission and may change it, answer it, route it to
another served model or refuse it; a post-stage sees each choice's text as it streams and may
change it or stop the stream with its own finish reason. See ``surge.stages.api`` for the
interface and ``surge.stages.loader`` for ``--stage``. Built in: ``intent-router``,
``pii-redactor``, ``output-filter``.
"""

from surge.stages.api import (
    Answer,
    Continue,
    PostStage,
    PostStream,
    PreDecision,
    PreStage,
    Refuse,
    Route,
    StageHost,
    StageRequest,
    Stop,
)

__all__ = [
    "Answer",
    "Continue",
    "PostStage",
    "PostStream",
    "PreDecision",
    "PreStage",
    "Refuse",
    "Route",
    "StageHost",
    "StageRequest",
    "Stop",
]
