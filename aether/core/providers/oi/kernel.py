"""Open Interpreter's Python kernel around a stop: interrupt the code, drop what it said after.

OI runs Python in a Jupyter kernel, read by a listener thread per execution. Stopping a turn
closes OI's generator, which neither interrupts the code nor reads the rest of its output: the
code would run on, and its late output (up to the interrupt's traceback) would be read as the
next turn's. So a stop interrupts the kernel at once, and a turn that follows a stopped one
first waits until the kernel is quiet, dropping the output left over.

These reach into OI 0.4.3's ``JupyterLanguage`` (``km``, ``kc``), which the extra pins.

@.architecture
role: interpreter kernel control
jobs: [cancellation, cleanup]
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# How long a turn waits for a stopped kernel to be idle before it starts anyway.
SETTLE_TIMEOUT_S = 5.0
# Silence on the kernel's output channel after which a stopped turn's leftovers are all read.
QUIET_S = 0.2


def _kernels(instance: Any) -> Iterator[Any]:
    languages = getattr(instance.computer.terminal, "_active_languages", {}) or {}
    for language in list(languages.values()):
        if getattr(language, "km", None) is not None and getattr(language, "kc", None) is not None:
            yield language


def interrupt_running_code(instance: Any) -> None:
    """Interrupt whatever the instance's kernels run (harmless when they are idle)."""
    instance.computer.terminal.stop()  # ends OI's listener loop
    for language in _kernels(instance):
        try:
            language.km.interrupt_kernel()
        except Exception:
            log.debug("interrupting a kernel raised", exc_info=True)


def settle_kernels(instance: Any) -> None:
    """Wait (bounded) until each kernel's interrupted code has ended and the kernel has been quiet
    for ``QUIET_S``, dropping the output it left unread. A sandboxed kernel is interrupted by
    control messages (two: the stop's, and OI's listener's), whose own busy/idle statuses can
    come after the code's end, and the second interrupt can land while the first one's traceback
    is being written: OI would read either as the next code's output or end."""
    for language in _kernels(instance):
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        running: set[str] = set()  # executions seen here that have not ended yet
        dropped = 0
        while time.monotonic() < deadline:
            try:
                message = language.kc.iopub_channel.get_msg(timeout=QUIET_S)
            except queue.Empty:
                if not running:
                    break
                continue
            dropped += 1
            parent = message.get("parent_header") or {}
            if parent.get("msg_type") == "execute_request":
                running.add(parent.get("msg_id", ""))
                if _is_idle(message):
                    running.discard(parent.get("msg_id", ""))
        if dropped:
            log.debug("dropped %d kernel messages left by a stopped turn", dropped)


def _is_idle(message: dict[str, Any]) -> bool:
    content = message.get("content", {})
    return message.get("msg_type") == "status" and content.get("execution_state") == "idle"
