"""``python -m aether --workers N``: one listening socket, N worker processes, one supervisor.

The supervisor binds the socket (so ``--port 0`` gives every worker the same port) and starts N
``python -m aether`` workers with its own arguments and environment, each told the inherited
socket (``--listen-fd``) and its name (``--worker-id``); the kernel spreads connections over
them. It serves nothing itself. The workers share the history file and Redis (the control
plane, ``core/control/redis_plane.py``).

- A worker that exits unasked (a crash, ``kill -9``): its answers left ``streaming`` in the shared
  history are marked ``interrupted`` (the other workers' are left alone), and a new worker takes
  its place. One that dies within ``YOUNG_S`` of its start waits longer each time before the
  next; after ``MAX_YOUNG_DEATHS`` such deaths in a row the supervisor stops every worker and
  exits 1, rather than restart a worker that cannot start for ever.
- SIGTERM or SIGINT: passed on to every worker, which drains as a single server does (grace, then
  each running chat stopped with its terminal); a second signal is passed on too (the workers
  stop their chats at once). The supervisor exits 0 once every worker has.
- Workers run in a session of their own, so a terminal's Ctrl-C reaches the supervisor only (and
  is passed on once). Each inherits the reading end of a pipe whose writing end only the
  supervisor holds (``--supervisor-fd``): if the supervisor dies, even by SIGKILL, the pipe
  reads end-of-file and every worker drains as on SIGTERM. (Not PR_SET_PDEATHSIG: it fires when
  the *thread* that started the worker ends, and Trio starts processes from worker threads.)

@.architecture
role: worker supervisor
jobs: [server_startup, signal_handling, crash_recovery]
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import repr_socket_addr
from prometheus_client import multiprocess

from aether.config import Settings
from aether.core.history.choice import writer_name
from aether.core.history.sqlite import mark_interrupted
from aether.core.metrics import MULTIPROCESS_DIR_VARIABLE
from aether.main import ShutdownSignals

log = logging.getLogger("aether.supervisor")

# A worker that dies sooner than this after its start died young.
YOUNG_S = 5.0
MAX_YOUNG_DEATHS = 5
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 10.0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        argv: Sequence[str],
        listener: socket.socket,
        metrics_dir: Path,
    ) -> None:
        self._settings = settings
        self._argv = list(argv)
        self._listener = listener
        self._metrics_dir = metrics_dir
        self._environment = {**os.environ, MULTIPROCESS_DIR_VARIABLE: str(metrics_dir)}
        # Workers read the first end; the second stays here, open until this process ends.
        self._lifeline, self._lifeline_held = os.pipe()
        self._processes: dict[int, trio.Process] = {}
        self.stopping = False
        self.failed = False
        # The first pause before a worker that died young is started again, and the longest.
        self.restart_delay_s = RESTART_DELAY_S
        self.max_restart_delay_s = MAX_RESTART_DELAY_S
        self._stop_requested = trio.Event()

    def _command(self, worker_id: str) -> list[str]:
        return [
            sys.executable, "-m", "aether", *self._argv,
            "--listen-fd", str(self._listener.fileno()),
            "--supervisor-fd", str(self._lifeline),
            "--worker-id", worker_id,
        ]  # fmt: skip

    async def run(self) -> int:
        signals = ShutdownSignals()  # the same signal handling as one server
        async with trio.open_nursery() as nursery:
            await nursery.start(signals.watch)
            async with trio.open_nursery() as workers:
                for index in range(self._settings.workers):
                    workers.start_soon(self._keep_running, index)
                address = repr_socket_addr(self._listener.family, self._listener.getsockname())
                log.info("supervising %d workers on %s", self._settings.workers, address)
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(self._pass_on, signals.requested, signal.SIGTERM)
                    waiting.start_soon(self._pass_on, signals.hurried, signal.SIGTERM)
                    await self._stop_requested.wait()
                    waiting.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
        log.info("every worker stopped")
        return 1 if self.failed else 0

    async def _pass_on(self, event: trio.Event, signum: signal.Signals) -> None:
        await event.wait()
        self._stop_all(signum)

    def _stop_all(self, signum: signal.Signals) -> None:
        self.stopping = True
        for process in list(self._processes.values()):
            if process.returncode is None:
                process.send_signal(signum)
        if not self._processes:
            self._stop_requested.set()

    async def _keep_running(self, index: int) -> None:
        young_deaths = 0
        delay = self.restart_delay_s
        while not self.stopping:
            worker_id = f"w{index}-{secrets.token_hex(4)}"
            started = time.monotonic()
            process = await trio.lowlevel.open_process(
                self._command(worker_id),
                env=self._environment,
                pass_fds=(self._listener.fileno(), self._lifeline),
                start_new_session=True,
            )
            self._processes[index] = process
            log.info("worker %s started (pid %d)", worker_id, process.pid)
            try:
                code = await process.wait()
            finally:
                del self._processes[index]
                if self.stopping and not self._processes:
                    self._stop_requested.set()
            if self.stopping:
                return
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            log.error("worker %s (pid %d) ended by itself (%s)", worker_id, process.pid, how)
            # Its gauges leave the sums; its counters stay (what it counted happened).
            multiprocess.mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
            await self._interrupt_answers(worker_id)
            if time.monotonic() - started < YOUNG_S:
                young_deaths += 1
                if young_deaths >= MAX_YOUNG_DEATHS:
                    log.error(
                        "worker %d died %d times within %.0f s of its start: stopping",
                        index,
                        young_deaths,
                        YOUNG_S,
                    )
                    self.failed = True
                    self._stop_all(signal.SIGTERM)
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, self.max_restart_delay_s)
            else:
                young_deaths, delay = 0, self.restart_delay_s

    async def _interrupt_answers(self, worker_id: str) -> None:
        settings = self._settings
        if not settings.history:
            return
        try:
            if settings.database_url is not None:
                # At once, rather than when its lease runs out (any node's sweep would).
                from aether.core.history.postgres import interrupt_writer

                count = await interrupt_writer(
                    settings.database_url, writer_name(settings, worker_id)
                )
            else:
                count = await trio.to_thread.run_sync(mark_interrupted, settings.db_path, worker_id)
        except Exception:  # the history's own trouble: log it, keep supervising
            log.exception("could not mark worker %s's answers interrupted", worker_id)
            return
        if count:
            log.warning("%d answers of worker %s marked interrupted", count, worker_id)


def supervise(settings: Settings, argv: Sequence[str], config: HypercornConfig) -> int:
    """Bind, start the workers, and supervise them until a signal; returns the exit code."""
    sockets = config.create_sockets()
    listening = [*sockets.secure_sockets, *sockets.insecure_sockets]
    if len(listening) != 1:
        raise RuntimeError(f"expected one listening socket, got {len(listening)}")
    listener = listening[0]
    listener.listen(config.backlog)
    if settings.history and settings.database_url is None:
        # No worker runs yet: whatever was left streaming was a previous run's.
        count = mark_interrupted(settings.db_path)
        log.info(
            "history in %s (%d answers left streaming marked interrupted)", settings.db_path, count
        )
    # The workers' metrics, summed by whichever answers /metrics; gone with the supervisor.
    metrics_dir = Path(tempfile.mkdtemp(prefix="aether-metrics-"))
    try:
        return trio.run(Supervisor(settings, argv, listener, metrics_dir).run)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
