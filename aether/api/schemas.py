"""The REST API's response shapes as Pydantic models, for the OpenAPI document.

Request bodies are the models the routes validate with (``ws.protocols.ChatBody``,
``openai_compat.CompletionBody``); these describe what comes back, errors included. A model
with a ``media_types`` class variable is documented with those media types instead of JSON
(server-sent event streams).

@.architecture
role: API schemas
jobs: [schema_definition, documentation_generation]
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from quart_schema import Info
from quart_schema.openapi import OpenAPIProvider
from quart_schema.pydantic import File

from aether import __version__
from aether.protocol.server_messages import TokenUsage


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What went wrong, for people.")
    request_id: str | None = Field(description="Also in the X-Request-Id header and the log.")


class ErrorResponse(BaseModel):
    """An error: no traceback or internal detail, ever."""

    error: ErrorDetail


class ChatError(BaseModel):
    code: str
    message: str


class ChatAnswer(BaseModel):
    """The whole answer of a chat."""

    id: str
    status: Literal["completed", "stopped", "error"]
    content: str
    path: str | None = None
    model: str | None = Field(None, description="The model that answered (GET /v1/models).")
    conversation_id: str | None = None
    reason: Literal["stop", "disconnect", "shutdown"] | None = None
    error: ChatError | None = None


class ChatOrError(RootModel[ChatAnswer | ErrorResponse]):
    """The chat's answer with its error, or an error before the chat could start."""


class ChatEventStream(BaseModel):
    """Server-sent events: each message of the WebSocket protocol as `id: <seq>` and
    `data: <json>`, with `: keepalive` comments while idle."""

    media_types: ClassVar[tuple[str, ...]] = ("text/event-stream",)


class StopAccepted(BaseModel):
    """The chat is being stopped; its stream ends with `stopped`."""

    id: str
    status: Literal["stopping"]


class ApproveBody(BaseModel):
    """The answer to a chat's code ``confirmation``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    confirmation_id: str = Field(
        min_length=1,
        max_length=64,
        description="The confirmation_id of the confirmation answered; any other is refused "
        "(409 stale_confirmation) and nothing runs.",
    )
    approved: bool = Field(description="true runs the code; false ends the turn without it.")


class ApprovalAccepted(BaseModel):
    """The waiting turn goes on: the code runs (its output streams) or the turn ends."""

    id: str
    approved: bool


class Health(BaseModel):
    """The process serves."""

    status: Literal["ok"]
    version: str


class Ready(BaseModel):
    """Whether the engine runs (200) or not yet (503)."""

    status: Literal["ready", "starting"]
    default_path: str | None = None
    live_requests: int | None = None


class ConversationOut(BaseModel):
    id: str
    title: str
    created_at: float
    updated_at: float


class RenameBody(BaseModel):
    """A conversation's new title."""

    model_config = ConfigDict(extra="forbid", strict=True)

    title: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"\S",
        description="1 to 200 characters, not only spaces (stored without surrounding spaces).",
    )


class ConversationPage(BaseModel):
    """The caller's conversations, most recently updated first."""

    conversations: list[ConversationOut]
    next_before: float | None = Field(description="Pass as `before` for the next page.")


class ConversationsQuery(BaseModel):
    limit: int = Field(20, ge=1, le=100)
    before: float | None = None


class StoredMessageOut(BaseModel):
    id: int
    role: Literal["user", "assistant"]
    content: str
    status: Literal["streaming", "complete", "stopped", "error", "interrupted"]
    request_id: str | None
    created_at: float
    error_code: str | None = None
    model: str | None = Field(None, description="An answer's: the model that gave it.")
    usage: TokenUsage | None = Field(
        None, description="An answer's, once it ended: its turn's tokens, as its terminal said."
    )


class HistoryPage(BaseModel):
    """A conversation's messages, in order."""

    conversation_id: str
    messages: list[StoredMessageOut]


class HistoryQuery(BaseModel):
    conversation_id: str = Field(min_length=1)


class UsageQuery(BaseModel):
    days: int = Field(30, ge=1, le=366, description="How many days back, today included (UTC).")


class UsageCounts(BaseModel):
    turns: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_turns: int = Field(description="Of the turns, those whose counts are estimated.")


class UsageRow(UsageCounts):
    day: str = Field(description="YYYY-MM-DD (UTC).")
    model: str


class UsagePage(BaseModel):
    """The caller's token usage by day and model, oldest day first, and its total."""

    since: str
    usage: list[UsageRow]
    total: UsageCounts


class EventsQuery(BaseModel):
    after_seq: int | None = Field(
        None,
        ge=-1,
        description="The last `seq` the client received (-1: none); the `Last-Event-ID` "
        "header, which a browser's EventSource sends by itself, takes precedence.",
    )


class NoContent(BaseModel):
    """Done; no body."""

    media_types: ClassVar[tuple[str, ...]] = ()


class CompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class CompletionChoice(BaseModel):
    index: int
    message: CompletionMessage
    finish_reason: str


class ModelObject(BaseModel):
    """OpenAI's `model` object: a model this server answers with."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """OpenAI's model list (what `client.models.list()` reads)."""

    object: Literal["list"]
    data: list[ModelObject]


class CompletionUsage(BaseModel):
    """The turn's tokens: the upstream's counts, or estimated where it gave none."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's `chat.completion`, or with `stream: true` its `chat.completion.chunk` events
    ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage

    media_types: ClassVar[tuple[str, ...]] = ("application/json", "text/event-stream")


class Capability(BaseModel):
    available: bool
    reason: str | None = None


class CodeExecution(BaseModel):
    available: bool
    requires_approval: bool
    profile: str | None = Field(
        None, description="The Open Interpreter profile in use (oi_profile)."
    )


class FileChatCapability(Capability):
    max_file_bytes: int
    max_files_per_conversation: int
    file_types: list[str]


class ToolCatalog(BaseModel):
    """What this server offers."""

    paths: list[str]
    default_path: str
    default_reason: str = Field(
        description="Why the default path is the default, and how to change it."
    )
    model: str | None = Field(
        description="The model the http and oi paths ask (null when only the echo model runs)."
    )
    code_execution: CodeExecution
    web_search: Capability
    file_chat: FileChatCapability


class StoredFileOut(BaseModel):
    name: str = Field(description="The file's name as stored (cleaned of any path).")
    size: int


class ConversationFiles(BaseModel):
    """The files of a conversation, which its agentic turns can open."""

    conversation_id: str
    files: list[StoredFileOut]


class FileUpload(BaseModel):
    """One or more parts named ``file``; each part's file name must have an accepted
    extension (see ``GET /v1/tools``)."""

    file: File


def errors(*statuses: int) -> dict[int, tuple[type[BaseModel], None]]:
    """``document(responses=...)`` entries for error statuses, plus those every route has
    (authentication, the browser guard, rate limits, a failure)."""
    return dict.fromkeys({*statuses, 401, 403, 421, 429, 500}, (ErrorResponse, None))


class AetherOpenAPIProvider(OpenAPIProvider):
    """Quart-Schema's provider, completed where it leaves things out: streams and empty bodies
    by their media types, request bodies and required query parameters marked required."""

    def build_request_body(self, model: Any, source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body, definitions = super().build_request_body(model, source)
        body["required"] = True
        return body, definitions

    def build_querystring_parameters(
        self, model: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parameters, definitions = super().build_querystring_parameters(model)
        required = {name for name, field in model.model_fields.items() if field.is_required()}
        for parameter in parameters:
            if parameter["name"] in required:
                parameter["required"] = True
        return parameters, definitions

    def build_response_object(
        self, model: Any, headers_model: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        response, definitions = super().build_response_object(model, headers_model)
        media_types = getattr(model, "media_types", None)
        if media_types is not None:
            json_content = response["content"].get("application/json")
            content: dict[str, Any] = {}
            for media_type in media_types:
                if media_type == "application/json" and json_content is not None:
                    content[media_type] = json_content
                else:
                    content[media_type] = {"schema": {}}  # events of JSON objects
            if content:
                response["content"] = content
            else:
                del response["content"]
        return response, definitions


API_INFO = Info(
    title="Aether",
    version=__version__,
    description="Streams LLM chat over REST/SSE (here) and WebSocket (/ws, see the README).",
)
