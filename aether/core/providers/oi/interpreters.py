"""InterpreterManager: one Open Interpreter instance per conversation, never the global one.

Instances are created lazily (importing ``interpreter`` costs about 2 s, so it happens once, in
a worker thread), configured by server policy only, kept between the turns of a conversation,
and terminated (``computer.terminate()``) when evicted or when the server stops. Nothing a client
sends reaches their settings: ``auto_run`` comes from ``AETHER_OI_AUTO_RUN`` alone.

A conversation is its caller's: instances are kept by (owner, conversation id), since two callers
may each name a conversation "c1". With the sandbox on (``oi_sandbox``, see
``aether.core.providers.oi.sandbox``) an instance's code runs in bubblewrap, with the conversation's
file directory (``ConversationFiles.directory``) as its only writable place, seen at
/workspace. Without history, that directory holds nothing worth keeping and goes with the
instance.

@.architecture
role: interpreter manager
jobs: [oi_initialization, settings_configuration, cleanup]
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from aether.config import Settings
from aether.core.errors import PathUnavailable
from aether.core.files import ConversationFiles
from aether.core.models import Upstream
from aether.core.providers.oi import fences
from aether.core.providers.oi.profiles import OIProfile, load_profile
from aether.core.providers.oi.sandbox import WORKSPACE, Sandbox
from aether.core.providers.oi.watched_sockets import watched_client
from aether.core.providers.oi.web_search import INSTRUCTIONS as SEARCH_INSTRUCTIONS
from aether.core.providers.oi.web_search import web_search_code
from aether.core.providers.upstream_client import upstream_ssl_context

log = logging.getLogger(__name__)

# Set before the first import: litellm would otherwise fetch a cost map from the internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def oi_installed() -> bool:
    """Whether the ``aether[oi]`` extra is installed (checked without importing it)."""
    from importlib.util import find_spec

    return find_spec("interpreter") is not None


def agentic_path_enabled(settings: Settings) -> bool:
    """Whether this server offers the agentic path: the extra installed, and the one-model
    shorthand or a model table on the ``oi`` path."""
    wanted = settings.model_configured or any(entry.path == "oi" for entry in settings.models)
    return wanted and oi_installed()


Key = tuple[str, str]  # (owner, conversation id)
# LiteLLM's loggers: each has a handler of its own, which writes coloured lines to stderr.
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def _quiet_litellm() -> None:
    """LiteLLM's log lines go through Aether's logging (once, in its format, without terminal
    colours), and its advice printed to stdout on every failure ("Give Feedback", "Provider
    List") is not printed: the failure is logged as the HTTP path logs it."""
    import litellm

    litellm.suppress_debug_info = True
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _configured(instance: Any, s: Settings) -> Any:
    """An interpreter under the server's policy: offline, no telemetry, nothing kept under the
    home directory, code run only once approved unless the operator said otherwise."""
    instance.auto_run = s.oi_auto_run
    instance.offline = True
    instance.disable_telemetry = True
    instance.conversation_history = False  # no files under the home directory
    instance.verbose = False
    instance.llm.supports_functions = False
    instance.llm.supports_vision = False
    instance.llm.context_window = s.oi_context_window
    instance.llm.max_tokens = s.oi_max_tokens
    instance.computer.import_computer_api = False
    return instance


def _new_interpreter(cls: Any, settings: Settings, profile: OIProfile | None) -> Any:
    instance = cls()
    if profile is not None:
        profile.apply(instance)
    return _configured(instance, settings)


def _warm_up(cls: Any, settings: Settings, profile: OIProfile | None) -> httpx.Client:
    """One text turn of a throwaway interpreter against LiteLLM's mock answer (Open
    Interpreter's and LiteLLM's first-call imports), then one model call to a closed loopback
    port (the OpenAI client's: its modules, its HTTP client). No model is asked, no kernel
    starts: measured, a new conversation's first token then comes in 6 to 7 ms, against about
    450 ms cold."""
    import litellm

    # One HTTP client for every model call (LiteLLM made one per model and base URL on its
    # first call, about 30 ms: mostly its TLS context), trusting what the HTTP path trusts
    # (llm_ca_file) and honouring the proxy variables; its sockets can be shut down by a stop
    # before the model answered (``watched_sockets``).
    client = watched_client(upstream_ssl_context(settings))
    # The warm-up's own calls go nowhere else (a proxy in the environment is not asked).
    litellm.client_session = httpx.Client(trust_env=False)
    # With the profile: one that fails to apply stops the start, not the first turn.
    instance = _new_interpreter(cls, settings, profile)
    instance.auto_run = False
    _ask(instance, Upstream("http://127.0.0.1:9/v1", "warm-up"))

    def mocked(**params: Any) -> Any:
        params["mock_response"] = "Ready."
        yield from litellm.completion(**params)

    instance.llm.completions = mocked
    for _ in instance.chat("warm up", stream=True, display=False):
        pass
    with socket.socket() as closed:  # bound, never listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        message = [{"role": "user", "content": "warm up"}]
        try:
            for _ in litellm.completion(
                model="openai/warm-up",
                api_base=f"http://127.0.0.1:{port}/v1",
                api_key="none",
                messages=message,
                stream=True,
                num_retries=0,
            ):
                pass
        except Exception:  # refused, as meant
            log.debug("warm-up call refused, as meant")
    litellm.client_session.close()
    litellm.client_session = client
    return client


def _release_client(client: httpx.Client) -> None:
    """Close the model calls' HTTP client (its pooled connections) and have LiteLLM forget
    it, and the OpenAI clients it built on it."""
    import litellm

    if litellm.client_session is client:
        litellm.client_session = None
    litellm.in_memory_llm_clients_cache.flush_cache()  # type: ignore[no-untyped-call]
    client.close()


def _ask(instance: Any, upstream: Upstream) -> None:
    """Point the interpreter at the model of the turn it is about to run."""
    instance.llm.model = f"openai/{upstream.model}"
    instance.llm.api_base = upstream.base_url
    instance.llm.api_key = upstream.api_key or "none"


def _messages(history: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """Stored turns as an interpreter's conversation."""
    return [
        {"role": role, "type": "message", "content": content}
        for role, content in history
        if role in ("user", "assistant")
    ]


class InterpreterManager:
    def __init__(
        self, settings: Settings, files: ConversationFiles, sandbox: Sandbox | None
    ) -> None:
        self._settings = settings
        self._max = settings.oi_max_interpreters
        self._files = files
        self._sandbox = sandbox
        self._instances: OrderedDict[Key, Any] = OrderedDict()
        self._class: Any = None
        self.profile = load_profile(settings.oi_profile) if settings.oi_profile else None
        self.function_calling = settings.oi_function_calling
        # Upstream models (base URL, name) that refused a call offering tools (``auto``).
        self._fences_only: set[tuple[str, str]] = set()
        self.prepared = False  # Open Interpreter imported and its first call warmed
        self._client: httpx.Client | None = None  # the model calls' (set by ``prepare``)
        self._turns: dict[Key, trio.Lock] = {}  # held by the turn running in a conversation
        # Deleted conversations whose interpreter a turn was using: closed when that turn ends.
        self._forgotten: set[Key] = set()
        # The stored turns (request ids) each interpreter has run or was made from.
        self._known: dict[Key, set[str]] = {}
        self.created = 0  # interpreters made so far

    @property
    def open_count(self) -> int:
        """Interpreters open now."""
        return len(self._instances)

    def files_directory(self, owner: str, conversation_id: str) -> str:
        """Where the conversation's files are, as the code the model writes sees them."""
        if self._sandbox is not None:
            return WORKSPACE
        return str(self._files.directory(owner, conversation_id))

    def uses_tools(self, upstream: Upstream) -> bool:
        """Whether turns ask ``upstream``'s model for code as tool calls (else as fences)."""
        if self.function_calling == "auto":
            return (upstream.base_url, upstream.model) not in self._fences_only
        return self.function_calling == "on"

    def tools_refused(self, upstream: Upstream) -> None:
        """``upstream`` answered a call offering tools with a 400 or 422 (``auto``): its model
        is asked for code fences from now on."""
        key = (upstream.base_url, upstream.model)
        if key not in self._fences_only:
            self._fences_only.add(key)
            log.warning(
                "model %s at %s refused tool calls: the agentic path asks it for code in "
                "markdown fences from now on (AETHER_OI_FUNCTION_CALLING=auto)",
                upstream.model,
                upstream.base_url,
            )

    async def prepare(self) -> None:
        """Import Open Interpreter and LiteLLM and warm their first call, before the server
        says it is ready. Left to the first turn, this made its first token wait about half a
        second after a two to four second import, and held the event loop while it imported
        (an import holds the GIL): ``/health`` waited up to 150 ms."""
        started = time.perf_counter()
        cls = await self._interpreter_class()
        self._client = await trio.to_thread.run_sync(_warm_up, cls, self._settings, self.profile)
        self.prepared = True
        log.info("agentic path ready in %.1f s", time.perf_counter() - started)

    async def _interpreter_class(self) -> Any:
        if self._class is None:

            def load() -> Any:
                from interpreter import OpenInterpreter
                from interpreter.core.llm import llm

                _quiet_litellm()

                # Its reader of the model's code fences, with one that holds for any chunking
                # (see ``fences``); every interpreter of this server uses it.
                llm.run_text_llm = fences.run_text_llm
                return OpenInterpreter

            try:
                self._class = await trio.to_thread.run_sync(load)
            except ImportError:
                raise PathUnavailable(
                    "the oi path needs the open-interpreter extra: pip install 'aether[oi]'"
                ) from None
        return self._class

    @asynccontextmanager
    async def turn(
        self,
        owner: str,
        conversation_id: str,
        upstream: Upstream,
        history: tuple[tuple[str, str], ...] = (),
        history_turns: tuple[str, ...] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Any]:
        """The conversation's interpreter, for one turn (``request_id``): created on first use
        (from the conversation's stored ``history``, after a restart or once an idle one was
        closed).

        With several workers or nodes, a conversation's turns may run anywhere: an interpreter
        kept here may have missed some. ``history_turns`` (the stored turns' request ids) tells:
        if it names a turn this interpreter neither ran nor was made from, its conversation is
        taken again from the stored history (its kernel, and what the code left in it, stay); if
        it names turns but none this interpreter knows, the conversation was deleted and begun
        anew elsewhere (a notice this worker missed), and the interpreter is replaced.

        An interpreter is not safe for two turns at once, so a conversation's turns take it one
        at a time: a turn that starts while another runs waits (cancellably) for it to end."""
        key = (owner, conversation_id)
        lock = self._turns.setdefault(key, trio.Lock())
        try:
            async with lock:
                if history_turns is not None:
                    await self._follow_history(key, history, history_turns)
                instance = await self._get_or_create(key, history)
                _ask(instance, upstream)
                instance.llm.supports_functions = self.uses_tools(upstream)
                if history_turns is not None:
                    self._known.setdefault(key, set()).update(history_turns)
                if request_id is not None:
                    self._known.setdefault(key, set()).add(request_id)
                yield instance
        finally:
            if not lock.locked():
                del self._turns[key]
                if key in self._forgotten:
                    self._forgotten.discard(key)
                    await self._close_now(key)

    async def forget(self, owner: str, conversation_id: str) -> None:
        """The conversation was deleted: its interpreter goes too (its kernel, its sandbox, and
        the conversation it remembers), at once, or when the turn using it ends. A later turn of
        that id starts afresh."""
        key = (owner, conversation_id)
        if self._in_use(key):
            self._forgotten.add(key)
        else:
            await self._close_now(key)

    async def _follow_history(
        self, key: Key, history: tuple[tuple[str, str], ...], turns: tuple[str, ...]
    ) -> None:
        """Bring a kept interpreter in line with the stored conversation (see ``turn``)."""
        instance = self._instances.get(key)
        if instance is None:
            return
        known = self._known.get(key, set())
        # No stored turn at all says nothing: this turn's context may have been read before a
        # turn running here was stored.
        if turns and known and not known.intersection(turns):
            log.info("conversation %s was begun anew elsewhere: a new interpreter", key[1])
            await self._close_now(key)
        elif not known.issuperset(turns):
            log.info("conversation %s had turns elsewhere: its messages are reloaded", key[1])
            instance.messages = _messages(history)

    async def _close_now(self, key: Key) -> None:
        self._known.pop(key, None)
        instance = self._instances.pop(key, None)
        if instance is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, key, instance)

    def _in_use(self, key: Key) -> bool:
        lock = self._turns.get(key)
        return lock is not None and lock.locked()

    async def _get_or_create(self, key: Key, history: tuple[tuple[str, str], ...]) -> Any:
        instance = self._instances.get(key)
        if instance is not None:
            self._instances.move_to_end(key)
            return instance
        cls = await self._interpreter_class()
        created: Any = await trio.to_thread.run_sync(self._create, cls, key)
        self.created += 1
        created.messages = _messages(history)
        self._instances[key] = created
        # Close the least recently used beyond the cap, but never one a turn is using: the cap
        # is then exceeded until those turns end and a later creation closes them.
        idle = [other for other in self._instances if not self._in_use(other)]
        for other in idle[: max(0, len(self._instances) - self._max)]:
            if other != key:
                self._known.pop(other, None)
                await trio.to_thread.run_sync(self._close, other, self._instances.pop(other))
        return created

    def _new(self, cls: Any) -> Any:
        """An interpreter: the operator's profile, then the server's policy over it."""
        return _new_interpreter(cls, self._settings, self.profile)

    def _create(self, cls: Any, key: Key) -> Any:
        s = self._settings
        instance = self._new(cls)
        if self._sandbox is not None:
            from aether.core.providers.oi.kernel_sandbox import confine

            confine(instance, self._sandbox, self._files.directory(*key))
        search = web_search_code(s)
        if search is not None:
            instance.custom_instructions = SEARCH_INSTRUCTIONS
            instance.computer.run("python", search)
        return instance

    def _close(self, key: Key, instance: Any) -> None:
        try:
            instance.computer.terminate()
        except Exception:
            log.exception("terminating an interpreter failed")
        if self._sandbox is not None and not self._settings.history:
            shutil.rmtree(self._files.directory(*key), ignore_errors=True)

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            while self._instances:
                key, instance = self._instances.popitem()
                await trio.to_thread.run_sync(self._close, key, instance)
            if self._client is not None:
                await trio.to_thread.run_sync(_release_client, self._client)
                self._client = None
