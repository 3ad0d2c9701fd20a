"""File chat over REST: upload files to a conversation (``multipart/form-data``) and list them.

``POST /v1/conversations/<id>/files`` stores each part named ``file`` in the caller's conversation
of that id (conversation ids are per caller; a new one is created); the next chat in that
conversation on the agentic path is told where they are. A request is all or nothing: every
name, type and the count are checked before anything is written, and the files are put in place
only once all of them are whole; on any failure none is stored. ``GET`` lists them; a
conversation the caller does not have answers 404, whoever else has one of that id.

@.architecture
role: file chat REST endpoints
jobs: [file_storage, response_formatting]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from quart import Blueprint, Response, request
from quart_schema import DataSource, document
from werkzeug.datastructures import FileStorage

from aether.api.dependencies import app_state, caller_identity
from aether.api.errors import error_response
from aether.api.responses import json_error, json_response
from aether.api.schemas import ConversationFiles, FileUpload, errors
from aether.core.errors import (
    AetherError,
)
from aether.core.files import StoredFile, file_json
from aether.protocol.messages import valid_conversation_id

log = logging.getLogger(__name__)
blueprint = Blueprint("files", __name__)

COPY_CHUNK_BYTES = 256 * 1024


@blueprint.post("/v1/conversations/<conversation_id>/files")
@document(
    request=FileUpload,
    request_source=DataSource.FORM_MULTIPART,
    responses={201: (ConversationFiles, None), **errors(400, 404, 409, 413, 415, 503)},
)
async def upload_files(conversation_id: str) -> Response:
    if not valid_conversation_id(conversation_id):
        return json_error(400, "invalid_request", "not a valid conversation id")
    if request.mimetype != "multipart/form-data":
        return json_error(
            400, "invalid_request", "send the files as multipart/form-data, in parts named 'file'"
        )
    parts = (await request.files).getlist("file")
    if not parts:
        return json_error(400, "invalid_request", "no part named 'file' in the form")
    try:
        stored = await _store_all(conversation_id, parts)
    except AetherError as exc:
        return error_response(exc)
    return json_response(
        {"conversation_id": conversation_id, "files": [file_json(f) for f in stored]}, 201
    )


async def _store_all(conversation_id: str, parts: Sequence[FileStorage]) -> list[StoredFile]:
    file_chat = app_state().engine.file_chat
    owner = caller_identity()
    batch = await file_chat.open_batch(owner, conversation_id, [p.filename or "" for p in parts])
    try:
        for part in parts:
            upload = await batch.open_next()
            while data := await trio.to_thread.run_sync(part.stream.read, COPY_CHUNK_BYTES):
                await upload.write(data)
            await upload.close()
    except BaseException:
        await batch.abort()
        raise
    return await file_chat.finish_batch(owner, conversation_id, batch)


@blueprint.get("/v1/conversations/<conversation_id>/files")
@document(responses={200: (ConversationFiles, None), **errors(404, 503)})
async def list_files(conversation_id: str) -> Response:
    try:
        stored = await app_state().engine.file_chat.stored(caller_identity(), conversation_id)
    except AetherError as exc:
        return error_response(exc)
    return json_response(
        {"conversation_id": conversation_id, "files": [file_json(f) for f in stored]}
    )
