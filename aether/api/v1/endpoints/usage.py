"""``GET /v1/usage``: the caller's token usage, by day (UTC) and model.

Every turn counts, stopped and failed ones included (what the model generated before the end),
in the upstream's own counts where it gave them and estimated where not (``estimated_turns``
says how many). The totals live apart from the conversations: deleting one leaves them.

@.architecture
role: usage REST endpoint
jobs: [usage_accounting]
"""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, request
from quart_schema import document

from aether.api import query
from aether.api.dependencies import caller_identity
from aether.api.errors import error_response
from aether.api.responses import json_error, json_response
from aether.api.schemas import UsagePage, UsageQuery, errors
from aether.api.v1.endpoints.conversations import history_store
from aether.core.errors import StorageError
from aether.core.history.store import UsageTotal, usage_day

blueprint = Blueprint("usage", __name__)

DEFAULT_DAYS = 30
MAX_DAYS = 366
DAY_S = 86_400


@blueprint.get("/v1/usage")
@document(querystring=UsageQuery, responses={200: (UsagePage, None), **errors(400, 404, 503)})
async def usage() -> Response:
    """The caller's tokens of the last ``days`` days (today included), by day and model."""
    store = history_store()
    if isinstance(store, Response):
        return store
    try:
        days = query.integer(request.args, "days", DEFAULT_DAYS)
    except query.InvalidQuery as exc:
        return json_error(400, "invalid_request", str(exc))
    if not 1 <= days <= MAX_DAYS:
        return json_error(400, "invalid_request", f"days must be between 1 and {MAX_DAYS}")
    since = time.time() - (days - 1) * DAY_S
    try:
        totals = await store.usage(caller_identity(), since)
    except StorageError as exc:
        return error_response(exc)
    return json_response(
        {
            "since": usage_day(since),
            "usage": [_row(total) for total in totals],
            "total": _sum(totals),
        }
    )


def _row(total: UsageTotal) -> dict[str, Any]:
    return {
        "day": total.day,
        "model": total.model,
        "turns": total.turns,
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "total_tokens": total.prompt_tokens + total.completion_tokens,
        "estimated_turns": total.estimated_turns,
    }


def _sum(totals: list[UsageTotal]) -> dict[str, int]:
    prompt = sum(total.prompt_tokens for total in totals)
    completion = sum(total.completion_tokens for total in totals)
    return {
        "turns": sum(total.turns for total in totals),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated_turns": sum(total.estimated_turns for total in totals),
    }
