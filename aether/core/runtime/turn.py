"""ChatTurn: one chat request's life, step by step: open, relay, seal, close.

- ``open``: name the conversation and load its context (history), then announce ``accepted``;
- ``relay``: the producer (the path's provider) and the relay run in the turn's nursery, the
  chunks crossing a small memory channel;
- ``seal``: exactly one terminal message, queued once: ``completion``, ``error``, or ``stopped``.
  A stop seals the turn in the stop's own step (``RequestRecord.on_stop``), before its scope is
  cancelled: the terminal leaves with the writer's next batch, without waiting for the relay and
  the producer to notice the cancellation; the relay queues nothing after it;
- ``close``: the final save, the record's end, the metrics; shielded where it must finish.

Resource handling: the turn owns its record's cancel scope (cancelling it is the stop) and the
memory channel. Its history is written by the engine's one answer writer, beside the turn, so a
stop never waits for the store; an answer that ends before its start is stored waits for it.

Error handling: a provider failure arrives as an error chunk and becomes the ``error`` terminal;
an ``AetherError`` raised by a step is that terminal too, and so is a failed start of the history
(the writer reports it, and the turn ends as a stop ends it, with that error instead); any
other exception is logged with its traceback and told to the client as ``internal_error``.
``trio.Cancelled`` always propagates; a client whose writer is gone makes a ``disconnect``.

@.architecture
role: chat turn
jobs: [streaming_orchestration, cancellation, cleanup]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from aether.core.chat import ChatRequest, Chunk, error_chunk
from aether.core.chunk_channel import open_chunk_channel
from aether.core.control.plane import ControlPlane
from aether.core.errors import AetherError, PathUnavailable
from aether.core.history.recorder import TurnRecorder
from aether.core.history.store import MessageStatus
from aether.core.history.turns import TurnHistory
from aether.core.metrics import Metrics
from aether.core.providers.base import Provider
from aether.core.runtime.outlet import RequestOutlet
from aether.core.runtime.relay import StreamRelay
from aether.core.runtime.request import RequestRecord, RequestState, RequestTracker
from aether.core.runtime.streaming import ChatStreamer
from aether.core.usage import TurnUsage, Usage

log = logging.getLogger(__name__)

# Chunks buffered between a producer and its relay. Small: a stop discards at most this many.
CHUNK_BUFFER = 8
# How an ended request's answer is stored.
ANSWER_STATUS: dict[RequestState, MessageStatus] = {
    "completed": "complete",
    "stopped": "stopped",
    "error": "error",
    "running": "interrupted",
}


@dataclass(frozen=True)
class TurnServices:
    """What a turn uses of the engine."""

    streamer: ChatStreamer
    tracker: RequestTracker
    control: ControlPlane
    history: TurnHistory | None
    metrics: Metrics


class ChatTurn:
    def __init__(
        self,
        services: TurnServices,
        request: ChatRequest,
        outlet: RequestOutlet,
        provider: Provider | PathUnavailable,
        record: RequestRecord,
        unsaved_on: str | None = None,
    ) -> None:
        self._services = services
        # Another worker whose turn of this conversation may not be saved yet.
        self._unsaved_on = unsaved_on
        self.request = request
        self.record = record
        self.outlet = outlet
        self.relay = StreamRelay(request.id, outlet)
        self._provider = provider
        self._recorder: TurnRecorder | None = None
        # What the terminal will say unless the turn completes or fails first.
        self._outcome: RequestState = "stopped"
        self._failure: Chunk | None = None
        # The upstream's token counts, as the producer reports them.
        self.usage = TurnUsage()
        # The turn's usage as its terminal told it (set by ``seal``).
        self.settled_usage: Usage | None = None
        record.on_stop = self.seal

    async def run(self) -> RequestRecord:
        """Run the turn to its terminal and its final save."""
        in_flight = self._services.metrics.in_flight_on(self.record.path)
        in_flight.inc()
        try:
            with self.record.cancel_scope:
                await self._open()
                await self._relay()
            if not self.relay.finished:  # else a stop sealed it, and the client was told so
                self._outcome = "error" if self.relay.error is not None else "completed"
        except* trio.BrokenResourceError:
            # The client's writer is gone: the client left while this request streamed.
            self.record.stop_reason = self.record.stop_reason or "disconnect"
        except* AetherError as group:
            error = group.exceptions[0]
            assert isinstance(error, AetherError)
            log.warning("request %s: %s: %s", self.request.id, error.code, error.message)
            self._fail(error.code, error.message)
        except* Exception as group:
            log.error("request %s: relay failed", self.request.id, exc_info=group)
            self._fail(AetherError.code, "the server failed while streaming this request")
        finally:
            self.seal()
            await self._close()
            in_flight.dec()
        return self.record

    async def _open(self) -> None:
        history = self._services.history
        if history is not None:
            if self._unsaved_on is not None and self.request.conversation_id is not None:
                await self._services.control.await_saved(
                    self._unsaved_on, self.request.owner, self.request.conversation_id
                )
            self.request, self._recorder = await history.open(self.request)
            self.relay.transcript = self._recorder.transcript
        accepted: Chunk = {"path": self.record.path}
        if self.request.model is not None:
            accepted["model"] = self.request.model
        if self.request.conversation_id is not None:
            accepted["conversation_id"] = self.request.conversation_id
        await self.relay.announce(accepted)

    async def _relay(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            recorder.begin(self._start_failed)
        async with trio.open_nursery() as nursery:
            send, receive = open_chunk_channel(CHUNK_BUFFER, self.usage)
            nursery.start_soon(
                self._services.streamer.stream_chat, self.request, self._provider, send
            )
            with receive:
                await self.relay.relay_stream(receive)
        if recorder is not None:
            # An answer that outran its start waits for it (a failed start then ends the turn
            # with storage_error) and is stored with it, in one step.
            error = self.relay.error
            status = ANSWER_STATUS["error" if error is not None else "completed"]
            usage = self.usage.settle(self.request, self.relay.answer_chars)
            await recorder.await_start(status, (error or {}).get("code"), usage)

    def _start_failed(self, error: AetherError) -> None:
        """The history could not store the turn's start: end the turn with that error, as a
        stop ends it (sealed at once, then its scope cancelled), unless it has ended."""
        if self.relay.finished:
            return
        log.warning("request %s: %s: %s", self.request.id, error.code, error.message)
        self._fail(error.code, error.message)
        self.seal()
        self.record.cancel_scope.cancel()

    def _fail(self, code: str, message: str) -> None:
        self._outcome = "error"
        self._failure = error_chunk(code, message)

    def seal(self) -> None:
        """Queue the turn's terminal, once, after publishing its pending save (a follow-up sent
        on seeing the terminal then waits for this answer). Never blocks."""
        if self.relay.finished:
            return
        if self._recorder is not None and self._services.history is not None:
            self._services.history.publish(self._recorder)
        # What the model generated until now counts, however the turn ends.
        usage = self.usage.settle(self.request, self.relay.answer_chars)
        self.settled_usage = usage
        terminal: Chunk
        if self._outcome == "completed":
            terminal = {"role": "server", "type": "completion"}
        elif self._outcome == "error":
            terminal = dict(self._failure or self.relay.error or {})
        else:
            reason = self.record.stop_reason or "disconnect"
            terminal = {"role": "server", "type": "stopped", "reason": reason}
        terminal["usage"] = usage.as_json()
        self.relay.finish(terminal)
        # What the client was told; the record stays live until the turn's tasks end.
        self.record.state = self._outcome

    async def _close(self) -> None:
        record = self.record
        record.note(f"relayed {self.relay.chunks_relayed} chunks")
        recorder, history = self._recorder, self._services.history
        if recorder is not None and history is not None:
            error_code = (self._failure or self.relay.error or {}).get("code")
            await recorder.finish(ANSWER_STATUS[record.state], error_code, self.settled_usage)
            history.release(recorder)
        self._services.tracker.end_request(record, record.state)
        self._services.control.release(
            record.owner, record.id, self.request.conversation_id, retained=self.outlet.keep
        )
        self._observe()

    def _observe(self) -> None:
        record, relay = self.record, self.relay
        metrics = self._services.metrics
        metrics.requests_ended(record.path, record.state).inc()
        metrics.deltas_relayed.inc(relay.chunks_relayed)
        if relay.first_content_at is not None:
            ttft = relay.first_content_at - record.started_at
            metrics.first_token_on(record.path).observe(ttft)
        if record.cancel_requested_at is not None and record.ended_at is not None:
            latency = record.ended_at - record.cancel_requested_at
            metrics.stopped_by(record.stop_reason or "stop").observe(latency)
        error = self._failure or relay.error
        if record.state == "error" and error is not None:
            code = str(error.get("code", ""))
            if code.startswith("upstream_"):
                metrics.upstream_failed(code).inc()
