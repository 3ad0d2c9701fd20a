"""Conversation history over REST: list the caller's conversations, read one, rename one, delete
one (with its files).

Conversation ids are per caller: an id the caller does not have answers 404 (unknown), whether
or not another caller has a conversation of that id.

@.architecture
role: conversation REST endpoints
jobs: [history_retrieval]
"""

from __future__ import annotations

import logging

from quart import Blueprint, Response, request
from quart_schema import document

from aether.api import query
from aether.api.dependencies import app_state, caller_identity
from aether.api.errors import error_response, status_for
from aether.api.json_body import read_json_body
from aether.api.responses import json_error, json_response
from aether.api.schemas import (
    ConversationOut,
    ConversationPage,
    ConversationsQuery,
    HistoryPage,
    HistoryQuery,
    NoContent,
    RenameBody,
    errors,
)
from aether.core.errors import AetherError, StorageError, UnknownConversation
from aether.core.history.store import HistoryStore, conversation_json, message_json

log = logging.getLogger(__name__)
blueprint = Blueprint("conversations", __name__)

DEFAULT_PAGE = 20
MAX_PAGE = 100


def history_store() -> HistoryStore | Response:
    store = app_state().engine.history
    if store is None:
        return json_error(
            status_for("history_unavailable"), "history_unavailable", "this server keeps no history"
        )
    return store


@blueprint.get("/v1/conversations")
@document(
    querystring=ConversationsQuery,
    responses={200: (ConversationPage, None), **errors(400, 404, 503)},
)
async def list_conversations() -> Response:
    store = history_store()
    if isinstance(store, Response):
        return store
    try:
        limit = query.integer(request.args, "limit", DEFAULT_PAGE)
        before_ts = query.number(request.args, "before")
    except query.InvalidQuery as exc:
        return json_error(400, "invalid_request", str(exc))
    if not 1 <= limit <= MAX_PAGE:
        return json_error(400, "invalid_request", f"limit must be between 1 and {MAX_PAGE}")
    try:
        page = await store.list_conversations(caller_identity(), limit, before_ts)
    except StorageError as exc:
        return error_response(exc)
    next_before = page[-1].updated_at if len(page) == limit else None
    return json_response(
        {"conversations": [conversation_json(c) for c in page], "next_before": next_before}
    )


@blueprint.get("/v1/chat/history")
@document(querystring=HistoryQuery, responses={200: (HistoryPage, None), **errors(400, 404, 503)})
async def chat_history() -> Response:
    store = history_store()
    if isinstance(store, Response):
        return store
    try:
        conversation_id = query.single(request.args, "conversation_id")
    except query.InvalidQuery as exc:
        return json_error(400, "invalid_request", str(exc))
    if not conversation_id:
        return json_error(400, "invalid_request", "conversation_id is required")
    try:
        # A turn whose terminal the client has seen is read whole.
        await app_state().engine.wait_saved(caller_identity(), conversation_id)
        messages = await store.messages(caller_identity(), conversation_id)
    except (UnknownConversation, StorageError) as exc:
        return error_response(exc)
    return json_response(
        {"conversation_id": conversation_id, "messages": [message_json(m) for m in messages]}
    )


@blueprint.patch("/v1/conversations/<conversation_id>")
@document(
    request=RenameBody, responses={200: (ConversationOut, None), **errors(400, 404, 415, 503)}
)
async def rename_conversation(conversation_id: str) -> Response:
    store = history_store()
    if isinstance(store, Response):
        return store
    body = await read_json_body(RenameBody)
    if isinstance(body, Response):
        return body
    try:
        renamed = await store.rename_conversation(
            caller_identity(), conversation_id, body.title.strip()
        )
    except StorageError as exc:
        return error_response(exc)
    if renamed is None:
        return error_response(UnknownConversation(f"no conversation with id {conversation_id!r}"))
    return json_response(conversation_json(renamed))


@blueprint.delete("/v1/conversations/<conversation_id>")
@document(responses={204: (NoContent, None), **errors(404, 503)})
async def delete_conversation(conversation_id: str) -> Response:
    store = history_store()
    if isinstance(store, Response):
        return store
    try:
        deleted = await store.delete_conversation(caller_identity(), conversation_id)
    except StorageError as exc:
        return error_response(exc)
    log.info(
        "conversation %s %s",
        conversation_id,
        "deleted" if deleted else "not deleted: not found",
        extra={"conversation_id": conversation_id},
    )
    if not deleted:
        return error_response(UnknownConversation(f"no conversation with id {conversation_id!r}"))
    try:
        await app_state().engine.forget_conversation(caller_identity(), conversation_id)
    except AetherError as exc:
        log.error("conversation %s: its files were not deleted: %s", conversation_id, exc)
    return Response(b"", status=204)
