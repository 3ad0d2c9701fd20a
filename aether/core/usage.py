"""Token usage: what one chat turn cost, in the upstream's own counts where it gives them.

A turn's producer reports the upstream's ``usage`` (prompt and completion tokens) on its
``TurnUsage`` when the upstream sends it: the HTTP path asks for it
(``stream_options.include_usage``) and reads it from the stream's last chunk. Where there is
none (an upstream that does not send it, a turn stopped or failed before it came, the agentic
and echo paths) the turn's usage is estimated from the text, at about four characters a token as
OpenAI's own rule of thumb has it, and marked ``estimated``. A stopped or failed turn thus still
counts what the model generated before it ended.

@.architecture
role: token usage
jobs: [usage_accounting]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from aether.core.chat import ChatRequest

# OpenAI's rule of thumb for English text; a message's role and framing cost a few more.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimated_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)  # rounded up: any text is at least a token


def estimated_prompt_tokens(request: ChatRequest) -> int:
    """The turn's prompt as the model sees it: its context, then the user's message."""
    messages = [content for _, content in request.history]
    messages.append(request.message)
    return sum(estimated_tokens(len(text)) + TOKENS_PER_MESSAGE for text in messages)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "estimated": self.estimated,
        }


class TurnUsage:
    """Where a turn's producer reports the upstream's counts. The last report wins: a server
    that sends its running counts on every chunk ends with the whole answer's."""

    __slots__ = ("completion_tokens", "prompt_tokens", "reported")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reported = False

    def report(self, usage: Any) -> None:
        """Take an upstream ``usage`` object (ignored unless it holds both token counts)."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _count(prompt) and _count(completion):
            self.prompt_tokens, self.completion_tokens = prompt, completion
            self.reported = True

    def settle(self, request: ChatRequest, completion_chars: int) -> Usage:
        """The turn's usage as it ends: the upstream's counts, else estimated from the prompt
        and the ``completion_chars`` characters of answer relayed."""
        if self.reported:
            return Usage(self.prompt_tokens, self.completion_tokens, estimated=False)
        return Usage(
            estimated_prompt_tokens(request),
            estimated_tokens(completion_chars),
            estimated=True,
        )


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
