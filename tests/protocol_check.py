"""Every message the server sends over a WebSocket in the tests is checked against the AsyncAPI
document (``GET /asyncapi.json``): the document describes what the server really sends.

``ProtocolCheck`` wraps the WebSocket writer's encoder (``aether.ws.hub.encode``) for a test;
each distinct shape of message (its role, type, and its fields with their JSON types) is
validated once, and the test fails at its end if one matched no message of the document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema

from aether import __version__
from aether.protocol.asyncapi import asyncapi_document, server_message_schema

_VALIDATOR = jsonschema.Draft7Validator(server_message_schema(asyncapi_document(__version__)))
# Shapes already found valid in this session; the shapes the tests sent, for the coverage test.
_VALID: set[tuple[Any, ...]] = set()


def shape(message: dict[str, Any]) -> tuple[Any, ...]:
    return (
        message.get("role"),
        message.get("type"),
        message.get("code") if message.get("id") is None else None,
        tuple(sorted((key, type(value).__name__) for key, value in message.items())),
    )


def sent_types() -> set[tuple[Any, Any]]:
    """The (role, type) of every message shape the server was seen sending so far."""
    return {(role, kind) for role, kind, *_ in _VALID}


class ProtocolCheck:
    def __init__(self, encode: Callable[[dict[str, Any]], str]) -> None:
        self._encode = encode
        self.undescribed: list[str] = []

    def __call__(self, message: dict[str, Any]) -> str:
        key = shape(message)
        if key not in _VALID:
            errors = list(_VALIDATOR.iter_errors(message))
            if errors:
                self.undescribed.append(f"{message!r}: {errors[0].message[:200]}")
            else:
                _VALID.add(key)
        return self._encode(message)
