"""The WebSocket protocol as an AsyncAPI 3 document (``GET /asyncapi.json``), generated from the
models the server validates client frames with (``messages.py``) and those that describe what it
sends (``server_messages.py``), as ``/openapi.json`` is from the REST routes' models.

One channel, ``/ws``; the server receives the client messages and sends the server messages.
Every model is a component schema (Pydantic's JSON Schema, references rewritten to the
components) and a component message of the same name.

@.architecture
role: protocol description
jobs: [schema_definition]
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from pydantic import BaseModel

from aether import PROTOCOL_VERSION
from aether.protocol.messages import (
    SUBPROTOCOLS,
    ApproveMessage,
    ChatMessage,
    FileMessage,
    HistoryMessage,
    PingMessage,
    ResumeMessage,
    StopMessage,
)
from aether.protocol.server_messages import SERVER_MESSAGES

CLIENT_MESSAGES: tuple[type[BaseModel], ...] = (
    ChatMessage,
    StopMessage,
    ResumeMessage,
    ApproveMessage,
    PingMessage,
    HistoryMessage,
    FileMessage,
)
CHANNEL = "chat"
SCHEMAS = "#/components/schemas/"

DESCRIPTION = (
    "Aether's chat protocol: JSON text frames on one WebSocket, `/ws` (subprotocols "
    + ", ".join(f"`{name}`" for name in SUBPROTOCOLS)
    + "). A client starts chats, stops them, approves code and resumes a stream after a lost "
    "connection; the server streams each chat's messages, numbered by `seq`, to exactly one "
    "terminal. Files for a chat follow a `file` message as binary frames."
)


@cache
def asyncapi_document(server_version: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for model in (*CLIENT_MESSAGES, *SERVER_MESSAGES):
        name = model.__name__
        schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
        summary = inspect.getdoc(model)
        messages[name] = {
            "name": name,
            "title": name,
            **({"summary": summary.split("\n\n")[0].replace("\n", " ")} if summary else {}),
            "contentType": "application/json",
            "payload": {"$ref": SCHEMAS + name},
        }

    def refs(models: tuple[type[BaseModel], ...]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{CHANNEL}/messages/{m.__name__}"} for m in models]

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Aether WebSocket protocol",
            "version": str(PROTOCOL_VERSION),
            "description": DESCRIPTION + f" Served by Aether {server_version}.",
        },
        "defaultContentType": "application/json",
        "channels": {
            CHANNEL: {
                "address": "/ws",
                "title": "A client's connection",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": {
            "receiveClientMessage": {
                "action": "receive",
                "summary": "What a client sends.",
                "channel": {"$ref": f"#/channels/{CHANNEL}"},
                "messages": refs(CLIENT_MESSAGES),
            },
            "sendServerMessage": {
                "action": "send",
                "summary": "What the server sends.",
                "channel": {"$ref": f"#/channels/{CHANNEL}"},
                "messages": refs(SERVER_MESSAGES),
            },
        },
        "components": {"schemas": schemas, "messages": messages},
    }


def server_message_schema(document: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema any message the server sends must match (exactly one of its messages),
    its references resolved within ``document``."""
    return {
        "oneOf": [{"$ref": SCHEMAS + model.__name__} for model in SERVER_MESSAGES],
        "components": document["components"],
    }
