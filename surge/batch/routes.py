"""OpenAI's Files and Batches routes, and the one call that puts them on the app.

``POST /v1/files`` (multipart: ``file``, ``purpose=batch``), ``GET /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``,
``POST /v1/batches``, ``GET /v1/batches`` (``limit``, ``after``), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``. Shapes follow OpenAI's, so the official client works as is.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from surge.batch.config import BatchSettings
from surge.batch.schemas import BatchList, BatchObject, FileDeleted, FileList, FileObject
from surge.batch.service import BatchService
from surge.batch.store import BATCH_STATUSES, TERMINAL_STATUSES
from surge.http.errors import APIError
from surge.http.gate import key_owner
from surge.http.openapi import VALIDATION_ERROR, error_responses
from surge.http.responses import json_response
from surge.server.features import ServerHost

__all__ = ["BatchCreateRequest", "BatchFeature"]

MAX_LIST_LIMIT = 100

# What routes answer besides 200, by cause (the request gate in front of them gives 401 and
# 413; validation gives 400).
_ANY_ROUTE = {401: "missing or wrong API key (when the server has --api-key)",
              500: "unexpected server error"}
_BODY = {400: VALIDATION_ERROR, 413: "request body too large (--max-body-bytes)"}
_NO_FILE = {404: "no file with this id"}
_NO_BATCH = {404: "no batch with this id"}
_JSONL = {"application/jsonl": {"schema": {"type": "string"}}}


def _owner(request: Request) -> str:
    return key_owner(request.scope)


# Whose files and batches a request sees: its API key's only (everyone's when auth is off).
Owner = Annotated[str, Depends(_owner)]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str = Field(..., description="a file uploaded with purpose 'batch'")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: str = Field("24h", description="'24h' as OpenAI, or any '<n>h|m|s' "
                                                      "up to 168h")
    metadata: dict[str, str] | None = None


class BatchFeature:
    """The Files and Batches API as a feature of ``surge serve``."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings

    def mount(self, app: FastAPI, host: ServerHost) -> None:
        """Mount the routes and register the service (queue, worker, monitor)."""
        service = BatchService(app, self.settings, host)
        host.services.add(lambda: service.running(app))
        app.include_router(_files_router(service))
        app.include_router(_batches_router(service))


def _files_router(service: BatchService) -> APIRouter:
    router = APIRouter(prefix="/v1/files", tags=["batch"])

    @router.post("", response_model=FileObject, responses=error_responses({
        **_ANY_ROUTE, **_BODY,
        400: "purpose is not 'batch', or the file is not valid batch input (the message names "
             "the lines and what is wrong)"}))
    async def upload_file(owner: Owner,
                          file: UploadFile = File(...),  # noqa: B008 - FastAPI's idiom
                          purpose: str = Form(...)) -> Response:
        """Upload a JSONL batch input; every line is validated now (400 names the lines)."""
        content = await file.read()
        record = await service.upload_file(file.filename or "", purpose, content, owner)
        return json_response(record.to_api())

    @router.get("", response_model=FileList, responses=error_responses(_ANY_ROUTE))
    async def list_files(owner: Owner, purpose: str | None = None) -> Response:
        records = await service.list_files(purpose, owner)
        return json_response({"object": "list", "data": [r.to_api() for r in records],
                              "has_more": False})

    @router.get("/{file_id}", response_model=FileObject,
                responses=error_responses({**_ANY_ROUTE, **_NO_FILE}))
    async def retrieve_file(file_id: str, owner: Owner) -> Response:
        return json_response((await service.get_file(file_id, owner)).to_api())

    @router.get("/{file_id}/content", response_class=Response, responses={
        200: {"description": "the file's bytes (JSON Lines)", "content": _JSONL},
        **error_responses({**_ANY_ROUTE, **_NO_FILE})})
    async def file_content(file_id: str, owner: Owner) -> Response:
        return Response(await service.file_content(file_id, owner),
                        media_type="application/jsonl")

    @router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses({
        **_ANY_ROUTE, **_NO_FILE, 409: "the file is the input of a batch that has not ended"}))
    async def delete_file(file_id: str, owner: Owner) -> Response:
        await service.get_file(file_id, owner)  # another key's file is not found, not in use
        await _refuse_if_in_use(service, file_id)
        await service.delete_file(file_id, owner)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    return router


async def _refuse_if_in_use(service: BatchService, file_id: str) -> None:
    """A batch reads its input file until it ends (to expire its unanswered lines, and to
    requeue them after a restart): without it the batch would stay ``finalizing`` forever."""
    unfinished = [status for status in BATCH_STATUSES if status not in TERMINAL_STATUSES]
    batches = await asyncio.to_thread(service.store.batches_with_status, *unfinished)
    users = [batch.id for batch in batches if batch.input_file_id == file_id]
    if users:
        raise APIError(409, f"file {file_id} is the input of batch {users[0]}, which has not "
                            f"ended: cancel it (POST /v1/batches/{users[0]}/cancel) or wait "
                            "for it to end, then delete the file", param="file_id",
                       code="file_in_use")


def _batches_router(service: BatchService) -> APIRouter:
    router = APIRouter(prefix="/v1/batches", tags=["batch"])

    @router.post("", response_model=BatchObject, responses=error_responses({
        **_ANY_ROUTE, **_BODY, 404: "no file with id input_file_id"}))
    async def create_batch(body: BatchCreateRequest, owner: Owner) -> Response:
        """Start a batch over an uploaded file; all its lines must use ``endpoint``."""
        batch = await service.create_batch(body.input_file_id, body.endpoint,
                                           body.completion_window, body.metadata, owner)
        return json_response(batch.to_api())

    @router.get("", response_model=BatchList, responses=error_responses({
        **_ANY_ROUTE, 400: VALIDATION_ERROR, 404: "no batch with the id given as after"}))
    async def list_batches(owner: Owner, limit: int = Query(20, ge=1, le=MAX_LIST_LIMIT),
                           after: str | None = None) -> Response:
        """Newest first; pass the last id of a page as ``after`` for the next one."""
        batches, has_more = await service.list_batches(limit, after, owner)
        data: list[dict[str, Any]] = [b.to_api() for b in batches]
        return json_response({"object": "list", "data": data,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None,
                              "has_more": has_more})

    @router.get("/{batch_id}", response_model=BatchObject,
                responses=error_responses({**_ANY_ROUTE, **_NO_BATCH}))
    async def retrieve_batch(batch_id: str, owner: Owner) -> Response:
        return json_response((await service.get_batch(batch_id, owner)).to_api())

    @router.post("/{batch_id}/cancel", response_model=BatchObject, responses=error_responses({
        **_ANY_ROUTE, **_NO_BATCH, 413: _BODY[413],
        409: "the batch already ended (completed, failed or expired)"}))
    async def cancel_batch(batch_id: str, owner: Owner) -> Response:
        """Stop dispatching; lines in flight finish, then the batch is ``cancelled``."""
        return json_response((await service.cancel_batch(batch_id, owner)).to_api())

    return router
