"""Open Interpreter's code runners, sandboxed: its Python kernel and its shell run in bubblewrap.

OI 0.4.3 starts a language on its first use, from the classes in
``computer.terminal.languages``. ``confine`` leaves an instance two, both run through
``aether.core.providers.oi.sandbox``:

- **Python**: OI's Jupyter kernel, whose command (``KernelManager.format_kernel_cmd``, the seam
  jupyter_client offers) is wrapped in bwrap. Without the host's network namespace the kernel
  cannot reach OI's ZMQ sockets on loopback TCP, so they speak ZMQ over ``ipc`` (Unix sockets)
  in a runtime directory of the kernel's own, bound into the sandbox at the same path.
  An interrupt goes as a control message (``interrupt_mode = "message"``): a signal to bwrap
  never reaches the kernel, which runs in a session of its own.
- **Shell**: bash in the sandbox, fed on stdin as OI's ``SubprocessLanguage`` does.

OI's other languages (JavaScript, Ruby, R, PowerShell, AppleScript, Java, HTML, React) would
start programs from the server, outside any sandbox: an instance does not get them, and OI
answers code in them with "disabled or not supported". OI's "apt install" shortcut, which runs
apt (and sudo) on the server before any language sees the code, is closed as well.

Resource handling: a kernel's runtime directory is removed when the kernel is shut down.
jupyter_client's control socket is not thread-safe, and both OI's listener thread and a stop
interrupt through it, so interrupts and shutdown take a lock.

@.architecture
role: interpreter sandbox seam
jobs: [sandboxing, oi_initialization]
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from interpreter.core.computer.terminal.languages.python import Python
from interpreter.core.computer.terminal.languages.shell import Shell
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from aether.core.providers.oi.sandbox import Sandbox, spawn

log = logging.getLogger(__name__)

KERNEL_READY_TIMEOUT_S = 60.0
# What OI's JupyterLanguage runs in a new kernel.
KERNEL_SETUP = "%matplotlib inline\nimport matplotlib.pyplot as plt"


class SandboxedKernelManager(KernelManager):
    """A Python kernel in bubblewrap, reached over ZMQ ``ipc`` sockets."""

    def __init__(self, sandbox: Sandbox, workspace: Path, **kwargs: Any) -> None:
        runtime_dir = Path(os.path.realpath(tempfile.mkdtemp(prefix="aether-kernel-")))
        super().__init__(
            transport="ipc",
            connection_file=str(runtime_dir / "kernel.json"),
            kernel_name="python3",
            **kwargs,
        )
        self._sandbox = sandbox
        self._workspace = workspace
        self._runtime_dir = runtime_dir
        self._control_lock = threading.Lock()
        # The server's own Python, whatever kernel specs the machine has installed.
        self._kernel_spec = KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3 (sandboxed)",
            language="python",
            interrupt_mode="message",
        )

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        command = super().format_kernel_cmd(extra_arguments)
        return self._sandbox.argv(self._workspace, command, runtime_dir=self._runtime_dir)

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        spawn(asyncio.run, super()._async_launch_kernel(kernel_cmd, **kw))

    def interrupt_kernel(self) -> None:
        with self._control_lock:
            super().interrupt_kernel()

    def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        with self._control_lock:
            super().shutdown_kernel(now=now, restart=restart)

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        if not restart:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)


class SandboxedPython(Python):  # type: ignore[misc]
    """OI's Python, its kernel in the sandbox (``confine`` sets the class attributes)."""

    sandbox: Sandbox
    workspace: Path

    def __init__(self, computer: Any) -> None:
        # JupyterLanguage.__init__, with the sandboxed kernel, and a wait for the kernel's
        # answer instead of its fixed half-second sleep.
        self.computer = computer
        self.listener_thread = None
        self.finish_flag = False
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.km = SandboxedKernelManager(self.sandbox, self.workspace)
        self.km.start_kernel(env=self.sandbox.env)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=KERNEL_READY_TIMEOUT_S)
        except BaseException:
            self.terminate()
            raise
        for _ in self.run(KERNEL_SETUP):
            pass


class SandboxedShell(Shell):  # type: ignore[misc]
    """OI's shell, as bash in the sandbox (``confine`` sets the class attributes)."""

    sandbox: Sandbox
    workspace: Path
    process: subprocess.Popen[str] | None

    def start_process(self) -> None:
        # SubprocessLanguage.start_process, without the server's environment.
        if self.process:
            self.terminate()
        self.workspace.mkdir(parents=True, exist_ok=True)
        argv = self.sandbox.argv(self.workspace, ["bash"])

        def start() -> subprocess.Popen[str]:
            return subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=self.sandbox.env,
                encoding="utf-8",
                errors="replace",
            )

        process = self.process = spawn(start)
        for stream, is_error in ((process.stdout, False), (process.stderr, True)):
            threading.Thread(
                target=self.handle_stream_output, args=(stream, is_error), daemon=True
            ).start()


def _refuse_install(package: str) -> bool:
    log.info("refused to install %r on the server: code runs in a read-only sandbox", package)
    return False


def confine(instance: Any, sandbox: Sandbox, workspace: Path) -> None:
    """Make ``instance`` run code only in ``sandbox``, with ``workspace`` writable: Python and
    shell, both sandboxed, and no other language."""
    attributes = {"sandbox": sandbox, "workspace": workspace}
    terminal = instance.computer.terminal
    terminal.languages = [
        type("Python", (SandboxedPython,), attributes),
        type("Shell", (SandboxedShell,), attributes),
    ]
    terminal.sudo_install = _refuse_install
