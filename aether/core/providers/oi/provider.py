"""The agentic path: Open Interpreter, which writes code and (once approved) runs it.

``OpenInterpreter.chat(stream=True)`` is a blocking generator, so a turn runs in
``trio.to_thread.run_sync`` and its chunks cross back through ``trio.from_thread.run`` into the
request's memory channel.

Stop is real: when the request's scope is cancelled, a watcher closes the model's HTTP stream
from the Trio side (closing OI's generator alone does not) and interrupts code the kernel is
running; the thread's read fails at once, the generator is closed and the thread ends; Trio
waits for it (threads are never abandoned).

Code never runs without approval: a ``confirmation`` chunk is relayed to the client and the
thread waits, without holding the event loop, for ``approve`` (the code runs and its output
streams), a denial (the turn ends), or a stop. Iterating past a confirmation is what runs the
code, so a denied or stopped turn closes the generator instead.

@.architecture
role: Open Interpreter provider
jobs: [stream_generation, cancellation, approval_gating]
"""

from __future__ import annotations

import contextlib
import logging
import socket
import weakref
from collections.abc import Callable
from typing import Any

import httpx
import trio

from aether.core.chat import ChatRequest, Chunk
from aether.core.chunk_channel import ChunkSender
from aether.core.errors import ProviderError, UpstreamHTTPError, UpstreamUnavailable
from aether.core.files import ConversationFiles, StoredFile
from aether.core.models import Upstream
from aether.core.providers.base import Provider
from aether.core.providers.oi.approval import ApprovalGate
from aether.core.providers.oi.interpreters import InterpreterManager
from aether.core.providers.oi.kernel import interrupt_running_code, settle_kernels
from aether.core.providers.oi.upstream_errors import upstream_error
from aether.core.providers.oi.watched_sockets import reading_for, shut_down

log = logging.getLogger(__name__)

_KEYS = ("role", "type", "format", "content", "start", "end")


def lmc_chunk(chunk: dict[str, Any]) -> Chunk | None:
    """The part of an OI chunk that goes to clients (None for internal ones)."""
    if chunk.get("format") == "active_line" or chunk.get("type") == "review":
        return None
    return {key: chunk[key] for key in _KEYS if key in chunk}


def describe_files(files: list[StoredFile], message: str, directory: str) -> str:
    """The user's message, preceded by where the conversation's files are, for the model:
    ``directory`` is where the code it writes finds them (in the sandbox, /workspace)."""
    if not files:
        return message
    listing = ", ".join(f"{f.name} ({f.size} bytes)" for f in files)
    return (
        f"[The user uploaded these files to this conversation; they are in the directory "
        f"{directory}: {listing}. Open them from there.]\n\n{message}"
    )


class _ModelStream:
    """The model's current HTTP stream, so that a stop can close it from the Trio side: the
    stream LiteLLM returned, or before it returns (no headers yet) the socket its call reads."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.closed = False
        self._socket: socket.socket | None = None

    def watch(self, sock: socket.socket) -> None:
        self._socket = sock
        if self.closed:  # a stop came as the read began
            shut_down(sock)

    def close(self) -> None:
        self.closed = True
        shut_down(self._socket)
        stream = getattr(self.stream, "completion_stream", None)
        response = getattr(stream, "response", None)
        _shut_down_socket(response)
        for target in (stream, response):
            close = getattr(target, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.debug("closing the model stream raised", exc_info=True)


def _shut_down_socket(response: Any) -> None:
    """Shut the response's socket down. OI's thread may be blocked reading it (before the
    first token, say); closing a socket does not wake a read blocked in another thread, a
    shutdown does, and the upstream sees the connection end at once."""
    extensions = getattr(response, "extensions", None) or {}
    network_stream = extensions.get("network_stream")
    sock = network_stream.get_extra_info("socket") if network_stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class OIProvider:
    name = "oi"

    def __init__(
        self,
        manager: InterpreterManager,
        approval_for: Callable[[ChatRequest], ApprovalGate | None],
        files: ConversationFiles | None = None,
        timeouts: httpx.Timeout | None = None,
    ) -> None:
        self._manager = manager
        self._approval_for = approval_for
        self._files = files
        # The model calls' bounds, as the HTTP path's: connecting, and each silence.
        self._timeouts = timeouts
        # Interpreters whose last turn was stopped: the next turn first lets the kernel settle.
        self._interrupted: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def interpreters(self) -> InterpreterManager:
        return self._manager

    async def forget_conversation(self, owner: str, conversation_id: str) -> None:
        """The conversation was deleted: close its interpreter."""
        await self._manager.forget(owner, conversation_id)

    def serving(self, upstream: Upstream) -> Provider:
        """This path on one model: its turns ask ``upstream``."""
        return _ServingModel(self, upstream)

    async def stream(self, request: ChatRequest, send: ChunkSender, upstream: Upstream) -> None:
        conversation_id = request.conversation_id or request.id
        async with self._manager.turn(
            request.owner,
            conversation_id,
            upstream,
            request.history,
            request.history_turns,
            request.id,
        ) as instance:
            await self._turn(instance, request, send, upstream)

    async def _turn(
        self, instance: Any, request: ChatRequest, send: ChunkSender, upstream: Upstream
    ) -> None:
        message = request.message
        if self._files is not None and request.conversation_id is not None:
            stored = await self._files.materialise(request.owner, request.conversation_id)
            directory = self._manager.files_directory(request.owner, request.conversation_id)
            message = describe_files(stored, message, directory)
        model_stream = _ModelStream()
        manager = self._manager
        refusable = manager.function_calling == "auto"

        def tools_refused() -> None:
            manager.tools_refused(upstream)

        self._track_model_stream(
            instance, model_stream, self._timeouts, tools_refused if refusable else None
        )
        gate = self._approval_for(request)
        failure: ProviderError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_on_cancel, instance, model_stream)
            settle = instance in self._interrupted
            self._interrupted.discard(instance)
            try:
                await trio.to_thread.run_sync(
                    self._run_turn, instance, message, send, gate, model_stream, settle
                )
            except ProviderError as exc:
                failure = exc  # raised outside the nursery: not wrapped in an exception group
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _stop_on_cancel(self, instance: Any, model_stream: _ModelStream) -> None:
        """On a stop: close the model's stream and interrupt code the kernel may be running
        (closing the turn's generator alone would leave the code running)."""
        try:
            await trio.sleep_forever()
        finally:
            model_stream.close()
            self._interrupted.add(instance)
            try:
                interrupt_running_code(instance)
            except Exception:
                log.debug("interrupting the interpreter's code raised", exc_info=True)

    @staticmethod
    def _track_model_stream(
        instance: Any,
        model_stream: _ModelStream,
        timeouts: httpx.Timeout | None,
        tools_refused: Callable[[], None] | None = None,
    ) -> None:
        """Route the instance's model calls through one that remembers the open stream and
        names its failures as the HTTP path does. With ``tools_refused``, an upstream that
        answers a call offering tools with 400 or 422 is told to it, and the turn starts
        again without them (``_ToolsRefused``)."""
        import litellm

        read_timeout_s = (timeouts.read if timeouts is not None else None) or 0.0

        def completions(**params: Any) -> Any:
            if model_stream.closed:
                # Stopped: OI would still ask the model about the interrupted code's output.
                raise UpstreamUnavailable("the turn was stopped")
            params["model"] = params["model"].replace(":latest", "")
            params["num_retries"] = 0
            if timeouts is not None:
                params["timeout"] = timeouts
            litellm.drop_params = True
            answered = False
            try:
                with reading_for(model_stream):
                    model_stream.stream = litellm.completion(**params)
                if model_stream.closed:
                    model_stream.close()
                with reading_for(model_stream):
                    stream = iter(model_stream.stream)
                while True:
                    with reading_for(model_stream):
                        chunk = next(stream, None)
                    if chunk is None:
                        break
                    answered = True
                    yield chunk
            except Exception as exc:
                if model_stream.closed:
                    raise  # stopped: the turn ends as a stop, whatever the read said
                error = upstream_error(exc, answered, read_timeout_s)
                refused = isinstance(error, UpstreamHTTPError) and error.status in (400, 422)
                if refused and tools_refused is not None and params.get("tools") and not answered:
                    tools_refused()
                    raise _ToolsRefused from exc
                raise error from exc

        instance.llm.completions = completions

    @staticmethod
    def _run_turn(
        instance: Any,
        message: str,
        send: ChunkSender,
        gate: ApprovalGate | None,
        model_stream: _ModelStream,
        settle: bool,
    ) -> None:
        if settle:
            settle_kernels(instance)
        before = list(instance.messages)
        try:
            OIProvider._relay_turn(instance, message, send, gate, model_stream)
        except _ToolsRefused:
            # Nothing was relayed: the turn starts again, the model asked for code fences.
            instance.messages = before
            instance.llm.supports_functions = False
            OIProvider._relay_turn(instance, message, send, gate, model_stream)

    @staticmethod
    def _relay_turn(
        instance: Any,
        message: str,
        send: ChunkSender,
        gate: ApprovalGate | None,
        model_stream: _ModelStream,
    ) -> None:
        turn = instance.chat(message, stream=True, display=False)
        try:
            for chunk in turn:
                out = lmc_chunk(chunk)
                if out is None:
                    continue
                if chunk.get("type") != "confirmation":
                    trio.from_thread.run(send.send, out)
                    continue
                if gate is None:
                    return  # nobody can approve: the code does not run
                approved = trio.from_thread.run(gate.ask, out, send.send)
                if not approved:
                    return  # closing the generator below skips the code
        except (ProviderError, _ToolsRefused):
            raise
        except Exception as exc:
            if model_stream.closed:
                return  # stopped: the closed stream made the read fail
            raise UpstreamUnavailable(f"the agentic turn failed: {exc.__class__.__name__}") from exc
        finally:
            turn.close()


class _ToolsRefused(Exception):
    """The upstream refused a model call offering tools: the turn is to start again without."""


class _ServingModel:
    """The agentic path on one model (a conversation may change model between turns: its
    interpreter is kept, and asks the model of the turn it runs)."""

    name = "oi"

    def __init__(self, oi: OIProvider, upstream: Upstream) -> None:
        self._oi = oi
        self._upstream = upstream

    async def stream(self, request: ChatRequest, send: ChunkSender) -> None:
        await self._oi.stream(request, send, self._upstream)
