"""RedisControlPlane: the control plane of several workers (or nodes), in one Redis.

What lives in Redis (``aether:`` keys; one Redis database per Aether server):

- ``aether:worker:<worker id>``: the worker's lease, a key that expires ``lease_s`` after its
  last refresh (every third of that). A worker that dies stops refreshing; what it registered
  counts for nothing once its lease is gone.
- ``aether:live:<owner>``: a hash of the caller's live chats, request id -> worker id. Admission
  is one script (``ADMIT``): refuse a request id another live worker runs, count the caller's
  chats (entries of dead workers pruned when the count is at the limit), register. The caller's
  limit is the server's, not each worker's. A chat's release (``HDEL``) is queued and sent with
  the worker's next command, or within ``RELEASE_FLUSH_S``, so a quick chat costs one command.
- ``aether:turn:<owner>:<conversation id>``: the worker and request of the conversation's latest
  turn, set by its admission, deleted by its release (after its final save). A follow-up
  admitted while another live worker's marker stands asks that worker (``await_saved``) to
  answer once its turn is saved, if the turn already told its client its terminal: the client
  may have sent the follow-up on seeing it, and the final save comes after the terminal.
- ``aether:resumable:<owner>:<request id>``: the worker that keeps an ended resumable chat
  (for a resume), set by its release, expiring with the resume retention.
- ``aether:rate:<tier>:<ip>`` and ``aether:connections:<ip>``: the per-IP token buckets (kept
  on Redis' clock, ``TAKE_TOKEN``) and connection counts (worker id -> its count, ``CONNECT``),
  so the limits are the server's.
- ``aether:control:<worker id>``: the worker's channel. A stop or an approval for a request
  this worker does not run looks its owner worker up and publishes to it in one script
  (``ROUTE``); the owner answers on the asker's channel. No owner, or a dead one: the id is
  unknown (404); no answer within ``REPLY_TIMEOUT_S``, or Redis unreachable:
  ControlPlaneUnavailable (503).

A resume that lands on a worker that does not keep the chat is routed the same way (the live
hash, else the retention key) and the owner forwards the stream over the asker's channel, one
batch in flight (``core/control/resume_routing.py``).

Faults: a delta never touches Redis, so running streams never notice it. While Redis is
unreachable, the limits fall back to this worker's share (limit / workers; logged once), stops
of this worker's own chats work as ever, and stops that need routing answer 503.
When Redis is back (a lease refresh succeeds again, or finds its lease gone: Redis restarted
empty), the worker registers its live chats and connection counts again, so routing resumes
by itself. The channel subscription is taken again after a lost connection (``_listen``).

Resource handling: ``run`` holds the client, the subscription, the lease and the release
flusher for the engine's life; leaving it deletes the lease, so the worker's entries are dead at
once rather than after ``lease_s``.

@.architecture
role: Redis control plane
jobs: [worker_coordination, message_routing, limit_checking]
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

import coredis
import coredis.exceptions
import orjson
import trio
from prometheus_client import Counter

from aether.core.chat import StopReason
from aether.core.control.courier import Courier, unpacked
from aether.core.control.plane import RateVerdict, RoutedStream, StreamSink, WorkerCommands
from aether.core.control.resume_routing import IncomingStream, OutgoingStream
from aether.core.errors import (
    AetherError,
    ControlPlaneUnavailable,
    DuplicateRequest,
    StaleConfirmation,
    TooManyRequests,
    UnknownRequest,
)
from aether.core.token_bucket import TokenBucket

log = logging.getLogger(__name__)

PREFIX = "aether:"
WORKER_KEY = PREFIX + "worker:"
LIVE_KEY = PREFIX + "live:"
RATE_KEY = PREFIX + "rate:"
CONNECTIONS_KEY = PREFIX + "connections:"
TURN_KEY = PREFIX + "turn:"
# aether:resumable:<owner>:<request id>: the worker that keeps an ended chat for a resume.
RESUMABLE_KEY = PREFIX + "resumable:"
NO_KEY = PREFIX + "none"
CHANNEL = PREFIX + "control:"
# What every worker listens to besides its own channel: news for all (a deleted conversation).
EVERY_WORKER = CHANNEL + "*all"

# How long a routed stop or approval waits for the owner worker's answer.
REPLY_TIMEOUT_S = 2.0
# How long a follow-up waits for another worker's previous turn to be saved (its final save
# itself gives up after 5 s).
SAVED_TIMEOUT_S = 6.0
# A turn marker outlives any turn; a dead worker's are ignored (its lease is gone).
TURN_MARKER_MS = 24 * 3600 * 1000
# Longest a finished chat's release waits for a command to ride with.
RELEASE_FLUSH_S = 0.05
# After a lost subscription, the first wait before subscribing again, and the longest.
SUBSCRIBE_RETRY_MIN_S = 0.05
SUBSCRIBE_RETRY_MAX_S = 2.0
# Connecting, and waiting for one reply: Redis on the same network answers in well under this.
CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0

# Releases, in ADMIT and RELEASE: per released chat, three keys (its caller's live hash, its
# conversation's turn marker or NO_KEY, its retention key) and two arguments (its request id,
# how long this worker keeps it for a resume in ms, or 0), from KEYS[first] and
# ARGV[first_arg]. A marker is deleted only if it still names that chat.
RELEASE_LOOP = """
local function release(wid, first, first_arg)
  local n = 0
  for i = first, #KEYS, 3 do
    local rid = ARGV[first_arg + 2 * n]
    local retained_ms = tonumber(ARGV[first_arg + 2 * n + 1])
    n = n + 1
    redis.call('HDEL', KEYS[i], rid)
    if redis.call('GET', KEYS[i + 1]) == wid .. '|' .. rid then
      redis.call('DEL', KEYS[i + 1])
    end
    if retained_ms > 0 then
      redis.call('SET', KEYS[i + 2], wid, 'PX', retained_ms)
    end
  end
  return n
end
"""

# KEYS[1]: the caller's live hash; KEYS[2]: the conversation's turn marker (or NO_KEY); then
# the releases. ARGV: request id, worker id, limit, marker lifetime (ms), then the releases.
# Returns {verdict} or {'ok', worker whose turn of the conversation may be unsaved}.
ADMIT = (
    RELEASE_LOOP
    + """
local wid = ARGV[2]
release(wid, 3, 5)
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder then
  if redis.call('EXISTS', 'aether:worker:' .. holder) == 1 then
    return {'duplicate'}
  end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local limit = tonumber(ARGV[3])
if redis.call('HLEN', KEYS[1]) >= limit then
  local entries = redis.call('HGETALL', KEYS[1])
  for i = 1, #entries, 2 do
    if redis.call('EXISTS', 'aether:worker:' .. entries[i + 1]) == 0 then
      redis.call('HDEL', KEYS[1], entries[i])
    end
  end
  if redis.call('HLEN', KEYS[1]) >= limit then
    return {'limit'}
  end
end
redis.call('HSET', KEYS[1], ARGV[1], wid)
if KEYS[2] == 'aether:none' then
  return {'ok'}
end
local marker = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], wid .. '|' .. ARGV[1], 'PX', ARGV[4])
if marker then
  local previous = string.match(marker, '^(.-)|')
  if previous ~= wid and redis.call('EXISTS', 'aether:worker:' .. previous) == 1 then
    return {'ok', previous}
  end
end
return {'ok'}
"""
)

# KEYS[1]: the caller's live hash; KEYS[2]: the chat's retention key (a resume), or NO_KEY.
# ARGV: request id, this worker's id, the message. Returns 1 once the owner worker has the
# message; 0 when no live worker runs (or keeps) the id; -1 when its worker lives but does not
# listen (its subscription is reconnecting).
ROUTE = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if not holder and KEYS[2] ~= 'aether:none' then
  holder = redis.call('GET', KEYS[2])
end
if not holder or holder == ARGV[2] then
  return 0
end
if redis.call('EXISTS', 'aether:worker:' .. holder) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
if redis.call('PUBLISH', 'aether:control:' .. holder, ARGV[3]) == 0 then
  return -1
end
return 1
"""

# The releases from KEYS[1]; ARGV: this worker's id, then the releases.
RELEASE = (
    RELEASE_LOOP
    + """
return release(ARGV[1], 1, 2)
"""
)

# KEYS[1]: a token bucket (a hash: tokens, updated in ms by Redis' clock). ARGV: limit, window
# in ms. Returns {allowed, whole tokens left, ms until the next token}.
TAKE_TOKEN = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if not tokens then
  tokens = limit
  updated = now
end
tokens = math.min(limit, tokens + (now - updated) * limit / window)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * window / limit)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'u', now)
redis.call('PEXPIRE', KEYS[1], window)
return {allowed, math.floor(tokens), wait}
"""

# KEYS[1]: an IP's connection counts (a hash: worker id -> its connections from that IP).
# ARGV: this worker's id, its count with the new connection, the limit. Counts of dead workers
# are dropped. Returns 1 (counted) or 0 (refused).
CONNECT = """
local total = tonumber(ARGV[2])
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if entries[i] ~= ARGV[1] then
    if redis.call('EXISTS', 'aether:worker:' .. entries[i]) == 1 then
      total = total + tonumber(entries[i + 1])
    else
      redis.call('HDEL', KEYS[1], entries[i])
    end
  end
end
if total > tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# What talking to Redis may fail with.
REDIS_FAILURES = (coredis.exceptions.RedisError, TimeoutError, OSError)

# Errors a routed command may answer with, by code.
ROUTED_ERRORS: dict[str, type[AetherError]] = {
    UnknownRequest.code: UnknownRequest,
    StaleConfirmation.code: StaleConfirmation,
}


def new_worker_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


class RedisControlPlane:
    shared = True

    def __init__(
        self,
        url: str,
        lease_s: float,
        workers_hint: int,
        worker_id: str | None = None,
        commands: Counter | None = None,
        retention_s: float = 0.0,
    ) -> None:
        self.url = url
        self.worker_id = worker_id or new_worker_id()
        self.lease_s = lease_s
        # How long an ended resumable chat stays replayable (where it is, kept in Redis).
        self.retention_s = retention_s
        # This worker's share of a limit while Redis is unreachable.
        self._workers_hint = max(1, workers_hint)
        self._client: coredis.Redis[str] = coredis.Redis.from_url(
            url,
            decode_responses=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            stream_timeout=COMMAND_TIMEOUT_S,
        )
        self._admit = self._client.register_script(ADMIT)
        self._route = self._client.register_script(ROUTE)
        self._release = self._client.register_script(RELEASE)
        self._take_token = self._client.register_script(TAKE_TOKEN)
        self._connect = self._client.register_script(CONNECT)
        self._scripts = (self._admit, self._route, self._release, self._take_token, self._connect)
        self._commands: WorkerCommands | None = None
        self._nursery: trio.Nursery | None = None
        self._releases: list[_Release] = []
        self._release_due = trio.Event()
        self._calls: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._courier = Courier(self._publish_now)
        # Resumes routed here from other workers' clients (by call), and from here to others.
        self._incoming: dict[str, IncomingStream] = {}
        self._outgoing: dict[str, OutgoingStream] = {}
        self._reachable = False
        self._subscribed = False
        # The latest conversations other workers deleted and this one dropped.
        self._forgotten: collections.deque[tuple[str, str]] = collections.deque(maxlen=64)
        self._forgotten_changed = trio.Event()
        self._subscription_changed = trio.Event()
        self._listening = trio.CancelScope()
        self._listening_done = trio.Event()
        self._degraded_logged = False
        # Whether the lease was ever taken, and whether Redis may miss some of this worker's
        # running chats (a command failed since they were last registered).
        self._leased = False
        self._missing = False
        # Local counts for the fallback, kept by admit/release whatever Redis does.
        self._local_by_owner: dict[str, int] = {}
        # This worker's connections by IP (what it last told Redis, or will), the IPs whose
        # count changed since, and the buckets that stand in for Redis' while it is away.
        self._connections: dict[str, int] = {}
        self._connections_changed: set[str] = set()
        self._fallback_buckets: dict[str, TokenBucket] = {}
        # Round trips to Redis (a pipeline or a script is one), for /metrics.
        self._commands_counter = commands

    @property
    def reachable(self) -> bool:
        return self._reachable and self._subscribed

    # -- lifetime -------------------------------------------------------------------------

    async def run(
        self,
        commands: WorkerCommands,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._commands = commands
        # Once started, the client and its tasks run shielded, so that the worker can still
        # retire through it once cancelled; they end when this task lets them.
        client_scope = trio.CancelScope()
        async with trio.open_nursery() as guard:
            await guard.start(self._serve, client_scope)
            log.info("control plane: Redis at %s, worker %s", self._redacted_url, self.worker_id)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(COMMAND_TIMEOUT_S) as cleanup:
                    cleanup.shield = True
                    await self._retire()
                    # The subscription ends first, while its connection still works (coredis
                    # unsubscribes on the way out, and fails if the pool is closing meanwhile).
                    self._listening.cancel()
                    await self._listening_done.wait()
                client_scope.cancel()

    async def _serve(
        self, client_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        with client_scope:
            async with self._client, trio.open_nursery() as nursery:
                self._nursery = nursery
                # Not waited for: a worker starts (not ready) while Redis is unreachable.
                nursery.start_soon(self._subscribe)
                nursery.start_soon(self._keep_lease)
                nursery.start_soon(self._flush_releases)
                client_scope.shield = True
                task_status.started()

    @property
    def _redacted_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    async def _retire(self) -> None:
        """Leaving: what this worker registered is dead at once."""
        try:
            await self._flush_now()
            await self._client.delete([WORKER_KEY + self.worker_id])
        except (ControlPlaneUnavailable, *REDIS_FAILURES) as exc:
            log.warning("control plane: could not retire worker %s: %r", self.worker_id, exc)

    async def _subscribe(self) -> None:
        """Listen on this worker's channel; after a lost connection, subscribe again (a
        message published meanwhile is lost: its sender answers 503)."""
        try:
            with self._listening:
                await self._listen()
        finally:
            self._listening_done.set()

    async def _listen(self) -> None:
        channels = [CHANNEL + self.worker_id, EVERY_WORKER]
        delay = SUBSCRIBE_RETRY_MIN_S
        while True:
            try:
                async with self._client.pubsub(
                    channels=channels, ignore_subscribe_messages=True, retry_policy=None
                ) as subscription:
                    self._subscribed = True
                    self._subscription_changed.set()
                    self._subscription_changed = trio.Event()
                    delay = SUBSCRIBE_RETRY_MIN_S
                    async for message in subscription:
                        self._on_message(message)
            except* REDIS_FAILURES as group:
                # coredis raises from its task groups: the error comes in a group.
                if self._subscribed:
                    log.warning(
                        "control plane: subscription lost (%r); subscribing again",
                        group.exceptions[0],
                    )
            self._subscribed = False
            await trio.sleep(delay)
            delay = min(delay * 2, SUBSCRIBE_RETRY_MAX_S)

    async def wait_subscribed(self) -> None:
        """Wait until this worker listens on its channel."""
        while not self._subscribed:
            await self._subscription_changed.wait()

    def _on_message(self, message: Any) -> None:
        if message["type"] != "message":
            return
        try:
            data = message["data"]
            if isinstance(data, int):
                raise TypeError("a number, not a command")
            commands = unpacked(orjson.loads(data))
        except (orjson.JSONDecodeError, TypeError) as exc:
            log.warning("control plane: unreadable message ignored: %r", exc)
            return
        for command in commands:
            try:
                if not isinstance(command, dict):
                    raise TypeError("not an object")
                self._handle(command)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("control plane: unreadable command ignored: %r", exc)

    async def _keep_lease(self) -> None:
        while True:
            with contextlib.suppress(ControlPlaneUnavailable):
                await self.refresh_lease()
            await trio.sleep(self.lease_s / 3)

    async def refresh_lease(self) -> None:
        """Refresh this worker's lease. If Redis may miss some of its chats (admitted while
        Redis was unreachable, or forgotten by a restart: the lease is gone), register them
        again. Raises ControlPlaneUnavailable."""
        lease_ms = int(self.lease_s * 1000)
        key = WORKER_KEY + self.worker_id
        previous = await self._send(self._client.set(key, "1", px=lease_ms, get=True))
        if previous is None:
            if self._leased:
                log.warning("control plane: Redis lost this worker's lease; registering again")
                self._missing = True
            # A new Redis (or this worker's first lease): its scripts, before a burst of chats
            # all finds them missing at once.
            await self._load_scripts()
        self._leased = True
        if self._missing:
            await self._register_live()
            self._missing = False

    async def _load_scripts(self) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipeline:
                for script in self._scripts:
                    pipeline.script_load(script.script)
        except REDIS_FAILURES as exc:
            raise self._unreachable(exc) from exc
        self._reached()

    async def _register_live(self) -> None:
        """Register every chat this worker runs (after Redis was unreachable or restarted)."""
        assert self._commands is not None
        live = self._commands.live_requests()
        if not live and not self._connections:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipeline:
                for owner, request_id in live:
                    pipeline.hset(LIVE_KEY + owner, {request_id: self.worker_id})
                for ip, count in self._connections.items():
                    pipeline.hset(CONNECTIONS_KEY + ip, {self.worker_id: count})
        except REDIS_FAILURES as exc:
            raise self._unreachable(exc) from exc
        self._reached()
        log.info(
            "control plane: %d running chats and the connection counts registered again",
            len(live),
        )

    async def _send(self, command: Any) -> Any:
        """Await one Redis command; any failure to talk to Redis is ControlPlaneUnavailable."""
        try:
            result = await command
        except REDIS_FAILURES as exc:
            raise self._unreachable(exc) from exc
        self._reached()
        return result

    def _unreachable(self, exc: BaseException) -> ControlPlaneUnavailable:
        """Note that Redis did not answer (logged once per outage)."""
        if self._reachable or not self._degraded_logged:
            log.warning(
                "control plane: Redis unreachable (%r): limits apply per worker and stops "
                "of other workers' chats answer 503 until it is back",
                exc,
            )
            self._degraded_logged = True
        self._reachable = False
        self._missing = True
        return ControlPlaneUnavailable("the workers' control plane cannot be reached")

    def _reached(self) -> None:
        if self._commands_counter is not None:
            self._commands_counter.inc()
        if not self._reachable:
            if self._degraded_logged:
                log.info("control plane: Redis reachable again")
            self._reachable = True

    # -- admission ------------------------------------------------------------------------

    async def admit(
        self, owner: str, request_id: str, limit: int, conversation_id: str | None = None
    ) -> str | None:
        releases, self._releases = self._releases, []
        marker = TURN_KEY + owner + ":" + conversation_id if conversation_id else NO_KEY
        keys, args = _released([LIVE_KEY + owner, marker], releases)
        args[:0] = [request_id, self.worker_id, limit, TURN_MARKER_MS]
        try:
            with trio.CancelScope(shield=True):
                verdict = await self._send(self._admit(keys=keys, args=args))
        except ControlPlaneUnavailable:
            self._releases.extend(releases)
            share = max(1, limit // self._workers_hint)
            if self._local_by_owner.get(owner, 0) >= share:
                raise TooManyRequests(
                    f"at most {share} chats may run at once for one caller on this worker "
                    "while the control plane is unreachable"
                ) from None
            verdict = ["ok"]
        if verdict[0] == "duplicate":
            raise DuplicateRequest(f"request {request_id!r} is already running")
        if verdict[0] == "limit":
            raise TooManyRequests(f"at most {limit} chats may run at once for one caller")
        self._local_by_owner[owner] = self._local_by_owner.get(owner, 0) + 1
        return str(verdict[1]) if len(verdict) > 1 else None

    def release(
        self,
        owner: str,
        request_id: str,
        conversation_id: str | None = None,
        *,
        retained: bool = False,
    ) -> None:
        count = self._local_by_owner.get(owner, 0) - 1
        if count > 0:
            self._local_by_owner[owner] = count
        else:
            self._local_by_owner.pop(owner, None)
        retained_ms = int(self.retention_s * 1000) if retained else 0
        self._releases.append(_Release(owner, request_id, conversation_id, retained_ms))
        self._release_due.set()

    async def take_token(self, bucket: str, limit: int, window_s: float) -> RateVerdict:
        window_ms = max(1, int(window_s * 1000))
        try:
            allowed, left, wait_ms = await self._send(
                self._take_token(keys=[RATE_KEY + bucket], args=[limit, window_ms])
            )
        except ControlPlaneUnavailable:
            # This worker's share of the limit, in a bucket of its own, until Redis is back.
            local = self._fallback_buckets.get(bucket)
            if local is None:
                share = max(1, limit // self._workers_hint)
                local = self._fallback_buckets[bucket] = TokenBucket(
                    share, window_s, trio.current_time()
                )
            return local.take(trio.current_time())
        self._fallback_buckets.clear()
        return bool(allowed), int(left), int(wait_ms) / 1000

    async def connection_opened(self, ip: str, limit: int) -> bool:
        count = self._connections.get(ip, 0) + 1
        try:
            counted = await self._send(
                self._connect(keys=[CONNECTIONS_KEY + ip], args=[self.worker_id, count, limit])
            )
        except ControlPlaneUnavailable:
            counted = count <= max(1, limit // self._workers_hint)
            if counted:
                self._connections_changed.add(ip)  # told Redis once it answers
        if counted:
            self._connections[ip] = count
        return bool(counted)

    def connection_closed(self, ip: str) -> None:
        count = self._connections.get(ip, 0) - 1
        if count > 0:
            self._connections[ip] = count
        else:
            self._connections.pop(ip, None)
        self._connections_changed.add(ip)
        self._release_due.set()

    async def _flush_releases(self) -> None:
        while True:
            await self._release_due.wait()
            self._release_due = trio.Event()
            # Gathered: the chats that end meanwhile (or an admission takes them along).
            await trio.sleep(RELEASE_FLUSH_S)
            with contextlib.suppress(ControlPlaneUnavailable):  # kept; sent once Redis answers
                await self._flush_now()

    async def flush_releases(self) -> None:
        """Send the queued releases now. Raises ControlPlaneUnavailable."""
        await self._flush_now()

    async def _flush_now(self) -> None:
        releases, self._releases = self._releases, []
        changed, self._connections_changed = self._connections_changed, set()
        if not releases and not changed:
            return
        keys, args = _released([], releases)
        try:
            async with self._client.pipeline(transaction=False) as pipeline:
                if releases:
                    self._release(keys=keys, args=[self.worker_id, *args], client=pipeline)
                for ip in changed:
                    count = self._connections.get(ip, 0)
                    if count:
                        pipeline.hset(CONNECTIONS_KEY + ip, {self.worker_id: count})
                    else:
                        pipeline.hdel(CONNECTIONS_KEY + ip, [self.worker_id])
        except REDIS_FAILURES as exc:
            self._releases[:0] = releases
            self._connections_changed |= changed
            raise self._unreachable(exc) from exc
        self._reached()

    # -- routing --------------------------------------------------------------------------

    async def stop_elsewhere(self, request_id: str, owner: str, reason: StopReason) -> None:
        await self._call(
            owner, request_id, {"op": "stop", "owner": owner, "id": request_id, "reason": reason}
        )

    async def approve_elsewhere(
        self, request_id: str, owner: str, confirmation_id: str, approved: bool
    ) -> None:
        await self._call(
            owner,
            request_id,
            {
                "op": "approve",
                "owner": owner,
                "id": request_id,
                "confirmation_id": confirmation_id,
                "approved": approved,
            },
        )

    async def resume_elsewhere(
        self, request_id: str, owner: str, after_seq: int, sink: StreamSink
    ) -> RoutedStream | None:
        call, replies = self._open_call()
        incoming = IncomingStream(
            call, request_id, sink, self._tell, self._incoming_done, self.lease_s
        )
        self._incoming[call] = incoming
        command = {"op": "resume", "owner": owner, "id": request_id, "after_seq": after_seq}
        keys = [LIVE_KEY + owner, _retention_key(owner, request_id)]
        try:
            reply = await self._routed(call, replies, keys, command)
        except BaseException:
            self._incoming.pop(call, None)
            raise
        finally:
            del self._calls[call]
        if reply.get("exhausted"):
            self._incoming.pop(call, None)
            return None
        incoming.owner_worker = str(reply["from"])
        log.info(
            "control plane: resume of request %s forwarded by worker %s", request_id, reply["from"]
        )
        assert self._nursery is not None
        self._nursery.start_soon(incoming.keep)
        return incoming

    def _incoming_done(self, call: str) -> None:
        self._incoming.pop(call, None)

    def _tell(self, worker: str, message: dict[str, Any]) -> None:
        self._reply_soon(CHANNEL + worker, orjson.dumps(message))

    async def _publish(self, channel: str, message: bytes) -> int:
        """Publish on a worker's channel (with what else goes there this round); how many
        listeners got it. Raises ControlPlaneUnavailable."""
        return await self._courier.send(channel, message)

    async def _publish_now(self, channel: str, message: bytes) -> int:
        return int(await self._send(self._client.publish(channel, message)))

    async def _serve_resume(self, message: dict[str, Any]) -> None:
        """Forward one of this worker's chats to the client that resumed it on another."""
        assert self._commands is not None
        call, asker = str(message["call"]), str(message["from"])
        reply: dict[str, Any] = {"op": "reply", "call": call, "from": self.worker_id}
        try:
            source = self._commands.resume_stream(
                str(message["owner"]), str(message["id"]), int(message["after_seq"])
            )
        except AetherError as exc:
            reply["error"] = {"code": exc.code, "message": exc.message}
            await self._publish_reply(CHANNEL + asker, orjson.dumps(reply))
            return
        log.info("control plane: resume of request %s asked by worker %s", message["id"], asker)
        if source is None:
            reply.update(error=None, exhausted=True)
            await self._publish_reply(CHANNEL + asker, orjson.dumps(reply))
            return
        reply["error"] = None
        outgoing = OutgoingStream(call, source, CHANNEL + asker, self.worker_id)
        self._outgoing[call] = outgoing
        try:
            await outgoing.forward(self._publish, orjson.dumps(reply), self.lease_s / 3)
        finally:
            del self._outgoing[call]

    async def _forget(self, key: tuple[str, str]) -> None:
        assert self._commands is not None
        await self._commands.forget_local(*key)
        self._forgotten.append(key)
        self._forgotten_changed.set()
        self._forgotten_changed = trio.Event()

    async def wait_forgotten(self, owner: str, conversation_id: str) -> None:
        """Wait until this worker has dropped a conversation another deleted (tests)."""
        while (owner, conversation_id) not in self._forgotten:
            await self._forgotten_changed.wait()

    def conversation_deleted(self, owner: str, conversation_id: str) -> None:
        news = {"op": "forget", "from": self.worker_id, "owner": owner}
        self._reply_soon(EVERY_WORKER, orjson.dumps({**news, "conversation": conversation_id}))

    async def await_saved(self, worker: str, owner: str, conversation_id: str) -> None:
        call, replies = self._open_call()
        message = orjson.dumps(
            {
                "op": "saved",
                "call": call,
                "from": self.worker_id,
                "owner": owner,
                "conversation_id": conversation_id,
            }
        )
        try:
            received = await self._publish(CHANNEL + worker, message)
            if received:
                with trio.move_on_after(SAVED_TIMEOUT_S):
                    await replies.receive()
                    return
            log.warning(
                "control plane: worker %s did not say whether its turn of conversation %s is "
                "saved; the follow-up reads the history as it is",
                worker,
                conversation_id,
            )
        except ControlPlaneUnavailable:
            pass  # logged by _send; the history as it is
        finally:
            del self._calls[call]

    def _open_call(self) -> tuple[str, trio.MemoryReceiveChannel[dict[str, Any]]]:
        call = secrets.token_hex(8)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._calls[call] = send
        return call, receive

    async def _call(self, owner: str, request_id: str, command: dict[str, Any]) -> None:
        """Route ``command`` to the worker running the request; raise what it answers."""
        call, replies = self._open_call()
        try:
            reply = await self._routed(call, replies, [LIVE_KEY + owner, NO_KEY], command)
        finally:
            del self._calls[call]
        log.info(
            "control plane: %s of request %s done by worker %s",
            command["op"],
            request_id,
            reply.get("from", "?"),
        )

    async def _routed(
        self,
        call: str,
        replies: trio.MemoryReceiveChannel[dict[str, Any]],
        keys: list[str],
        command: dict[str, Any],
    ) -> dict[str, Any]:
        """Route ``command`` (its ``owner`` and ``id`` among its fields) to the worker ``keys``
        name (``ROUTE``); its reply. Raises the error it answers, UnknownRequest (no worker),
        ControlPlaneUnavailable (no answer)."""
        request_id = command["id"]
        message = orjson.dumps({**command, "call": call, "from": self.worker_id})
        received = await self._send(
            self._route(keys=keys, args=[request_id, self.worker_id, message])
        )
        if received == 0:
            raise UnknownRequest(f"no running request with id {request_id!r}")
        if received < 0:
            raise ControlPlaneUnavailable("the worker running that request cannot be reached")
        with trio.move_on_after(REPLY_TIMEOUT_S):
            reply = await replies.receive()
            error = reply.get("error")
            if error is not None:
                raise ROUTED_ERRORS.get(error["code"], AetherError)(error["message"])
            return reply
        raise ControlPlaneUnavailable("the worker running that request did not answer")

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "reply":
            waiter = self._calls.get(message["call"])
            if waiter is not None:
                waiter.send_nowait(message)
            return
        assert self._commands is not None
        assert self._nursery is not None
        if op == "saved":
            self._nursery.start_soon(self._answer_saved, message)
            return
        if op == "forget":
            if message["from"] != self.worker_id:
                key = (str(message["owner"]), str(message["conversation"]))
                self._nursery.start_soon(self._forget, key)
            return
        if op == "resume":
            self._nursery.start_soon(self._serve_resume, message)
            return
        if op in ("stream", "probe"):
            incoming = self._incoming.get(message["call"])
            if incoming is not None:
                incoming.receive(message)
            else:  # its client left: the owner stops forwarding
                self._tell(str(message["from"]), {"op": "detach", "call": message["call"]})
            return
        if op in ("ack", "detach"):
            outgoing = self._outgoing.get(message["call"])
            if outgoing is not None:
                if op == "ack":
                    outgoing.acked(int(message["through"]))
                else:
                    outgoing.scope.cancel()
            return
        error: dict[str, str] | None = None
        try:
            if op == "stop":
                self._commands.stop_local(message["id"], message["owner"], message["reason"])
            elif op == "approve":
                self._commands.approve_local(
                    message["id"],
                    message["owner"],
                    message["confirmation_id"],
                    bool(message["approved"]),
                )
            else:
                log.warning("control plane: unknown command %r ignored", op)
                return
        except AetherError as exc:
            error = {"code": exc.code, "message": exc.message}
        log.info(
            "control plane: %s of request %s asked by worker %s%s",
            op,
            message["id"],
            message["from"],
            f": {error['code']}" if error else "",
        )
        reply = orjson.dumps(
            {"op": "reply", "call": message["call"], "from": self.worker_id, "error": error}
        )
        self._reply_soon(CHANNEL + str(message["from"]), reply)

    async def _answer_saved(self, message: dict[str, Any]) -> None:
        assert self._commands is not None
        await self._commands.wait_saved(str(message["owner"]), str(message["conversation_id"]))
        reply = orjson.dumps({"op": "reply", "call": message["call"], "error": None})
        await self._publish_reply(CHANNEL + str(message["from"]), reply)

    def _reply_soon(self, channel: str, reply: bytes) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._publish_reply, channel, reply)

    async def _publish_reply(self, channel: str, reply: bytes) -> None:
        with contextlib.suppress(ControlPlaneUnavailable):  # the asker times out: a 503
            await self._publish(channel, reply)


@dataclass(frozen=True, slots=True)
class _Release:
    owner: str
    request_id: str
    conversation_id: str | None
    retained_ms: int


def _released(keys: list[str], releases: list[_Release]) -> tuple[list[str], list[str | int]]:
    """``keys`` followed by the releases' keys (three each), and the releases' arguments
    (two each)."""
    args: list[str | int] = []
    for release in releases:
        marker = release.conversation_id
        keys += [
            LIVE_KEY + release.owner,
            TURN_KEY + release.owner + ":" + marker if marker else NO_KEY,
            _retention_key(release.owner, release.request_id),
        ]
        args += [release.request_id, release.retained_ms]
    return keys, args


def _retention_key(owner: str, request_id: str) -> str:
    return RESUMABLE_KEY + owner + ":" + request_id
