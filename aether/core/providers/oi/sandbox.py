"""The sandbox approved code runs in: bubblewrap (``bwrap``), shaped by the settings.

A sandboxed process sees:

- an environment built from an allow-list (``--clearenv``, then ``--setenv``): PATH, locale,
  TERM, TZ, HOME in the workspace, what Python needs; never an ``AETHER_*`` variable, nothing
  whose name says key, token, secret or password, no proxy that carries credentials;
- the system read-only (``/usr``, ``/etc`` and the ``/bin``, ``/lib*`` links), the Python
  installation and the virtualenv the kernel runs from, read-only; private ``/dev``, ``/proc``
  and ``/tmp``; and one writable directory, the conversation's own, at ``/workspace`` (its cwd
  and HOME). Nothing else of the host: not ``/``, not the server's home, not the checkout, not
  the history database or the key files. Those that lie inside a read-only tree anyway (a keys
  file in ``/etc``, say) are masked, and so are the system's own credential stores;
- no network (its own empty network namespace) unless ``oi_sandbox_network`` or web search
  asks for it; no other namespace of the host (``--unshare-all``), no capabilities, and a
  session of its own, so it cannot push input into the server's terminal.

``Sandbox.argv`` is a pure function of the sandbox and the conversation's directory; the
machine is read once, by ``Sandbox.from_settings``.

Resource handling: bwrap's ``--die-with-parent`` kills the sandbox when the *thread* that
started it ends (``PR_SET_PDEATHSIG`` follows the thread), and Trio retires idle worker
threads after 10 s. So every sandbox is started by ``spawn``, on one thread that lives as long
as the process: a sandbox then dies with the server, and only then.

Error handling: with the agentic path enabled and the sandbox asked for, ``require_sandbox``
runs a sandbox once (``python -c pass`` inside it) and raises ``SandboxUnavailable`` with one
line naming the fix when bwrap is missing or does not work here.

@.architecture
role: code sandbox
jobs: [sandboxing, validation]
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

from aether.config import ConfigError, Settings

P = ParamSpec("P")
T = TypeVar("T")

# Where the conversation's directory appears inside the sandbox: its cwd and HOME.
WORKSPACE = "/workspace"
# Mounted read-only when present: the system, without /home, /root, /var, /srv, /opt, /run...
SYSTEM_TREES = ("/usr", "/etc")
# On merged-/usr systems these are links into /usr (mirrored as links), else directories.
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The system's own credentials, hidden even though /etc is visible: readable by a server that
# runs as root (inside the sandbox it keeps its uid, so it owns them).
SYSTEM_SECRETS = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
)
# Copied from the server's environment when set; everything else is dropped.
PASSED_VARIABLES = ("LANG", "LANGUAGE", "TERM", "TZ")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
PROBE_TIMEOUT_S = 20.0


class SandboxUnavailable(ConfigError):
    """The sandbox is asked for, and bwrap is missing or does not work on this machine."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How to run a command in bubblewrap: everything but the conversation's directory."""

    bwrap: str
    network: bool
    environment: tuple[tuple[str, str], ...]
    links: tuple[tuple[str, str], ...]  # (target, path): path is a symlink to target
    read_only: tuple[str, ...]  # bound read-only, each at its own path
    masked_dirs: tuple[str, ...]  # an empty read-only directory over each
    masked_files: tuple[str, ...]  # /dev/null over each

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        bwrap: str,
        *,
        environ: Mapping[str, str] | None = None,
        python_roots: Iterable[str] | None = None,
    ) -> Sandbox:
        """The sandbox the settings ask for, on this machine (which system directories exist,
        where Python lives, which of the server's secrets a read-only tree would show)."""
        network = settings.oi_sandbox_network or settings.search_url is not None
        links: list[tuple[str, str]] = []
        trees = [tree for tree in SYSTEM_TREES if os.path.isdir(tree)]
        for path in SYSTEM_LINKS:
            if os.path.islink(path):
                links.append((os.readlink(path), path))
            elif os.path.isdir(path):
                trees.append(path)
        if network and os.path.islink("/etc/resolv.conf"):
            # systemd-resolved's stub file lives under /run, which is not mounted.
            resolver = os.path.realpath("/etc/resolv.conf")
            if os.path.exists(resolver) and not _inside(resolver, trees):
                trees.append(resolver)
        roots = _outermost(python_roots if python_roots is not None else _python_roots())
        read_only = trees + [root for root in roots if not _inside(root, trees)]
        masked_dirs, masked_files = _masks(_server_secrets(settings), read_only)
        env = sandbox_environment(os.environ if environ is None else environ, network)
        return cls(
            bwrap=bwrap,
            network=network,
            environment=tuple(sorted(env.items())),
            links=tuple(links),
            read_only=tuple(read_only),
            masked_dirs=masked_dirs,
            masked_files=masked_files,
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment inside the sandbox (also given to bwrap itself: its pid 1 inside
        keeps the environment it was started with, readable in /proc/1/environ)."""
        return dict(self.environment)

    def argv(
        self, workspace: Path, command: Sequence[str], runtime_dir: Path | None = None
    ) -> list[str]:
        """bwrap's command line running ``command`` with ``workspace`` writable at /workspace;
        ``runtime_dir`` (a kernel's sockets and connection file) is writable at its own path."""
        argv = [self.bwrap, "--unshare-all"]
        if self.network:
            argv.append("--share-net")
        argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
        for name, value in self.environment:
            argv += ["--setenv", name, value]
        for path in self.read_only:
            argv += ["--ro-bind", path, path]
        for target, path in self.links:
            argv += ["--symlink", target, path]
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for path in self.masked_dirs:
            argv += ["--tmpfs", path, "--remount-ro", path]
        for path in self.masked_files:
            argv += ["--ro-bind", "/dev/null", path]
        if runtime_dir is not None:
            argv += ["--bind", str(runtime_dir), str(runtime_dir)]
        argv += ["--bind", str(workspace), WORKSPACE, "--chdir", WORKSPACE, "--", *command]
        return argv


def sandbox_environment(environ: Mapping[str, str], network: bool) -> dict[str, str]:
    """The sandbox's environment: fixed values, a few of the server's, never a secret."""
    python_bin = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{python_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": WORKSPACE,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        # What Open Interpreter sets in the server's environment for its kernels to inherit.
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "ANSI_COLORS_DISABLED": "1",
    }
    for name, value in environ.items():
        if name in PASSED_VARIABLES or name.startswith("LC_"):
            env[name] = value
        elif network and name.lower() in PROXY_VARIABLES and "@" not in urlsplit(value).netloc:
            env[name] = value  # a proxy without credentials: needed to reach the network
    return {
        name: value
        for name, value in env.items()
        if not name.startswith("AETHER_") and not SECRET_NAME.search(name)
    }


def _python_roots() -> list[str]:
    """The Python installation and the virtualenv the server (so the kernel) runs from."""
    return [sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix]


def _inside(path: str, trees: Iterable[str]) -> bool:
    return any(Path(path).is_relative_to(tree) for tree in trees)


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths, without duplicates and without those inside another of them."""
    unique = sorted({os.path.abspath(path) for path in paths})
    return [path for path in unique if not _inside(path, [p for p in unique if p != path])]


def _server_secrets(settings: Settings) -> list[str]:
    """What code must never see, whether or not a read-only tree contains it."""
    # The source checkout Aether runs from, if it does (not an installed package's directory).
    checkout = Path(__file__).resolve().parents[3]
    try:
        home: Path | None = Path.home()
    except RuntimeError:  # no HOME, and no password entry either
        home = None
    paths = [
        settings.db_path,
        settings.db_path.with_name(settings.db_path.name + "-wal"),
        settings.db_path.with_name(settings.db_path.name + "-shm"),
        settings.files_root,
        settings.api_keys_file,
        settings.tls_keyfile,
        home,
        checkout if (checkout / "pyproject.toml").is_file() else None,
    ]
    return [*SYSTEM_SECRETS, *(str(path) for path in paths if path is not None)]


def _masks(
    secrets: Iterable[str], read_only: Sequence[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(directories, files) among ``secrets`` that exist inside a read-only tree."""
    dirs: list[str] = []
    files: list[str] = []
    for path in secrets:
        absolute = os.path.abspath(path)
        if not _inside(absolute, read_only) or not os.path.lexists(absolute):
            continue
        (dirs if os.path.isdir(absolute) else files).append(absolute)
    return tuple(_outermost(dirs)), tuple(f for f in sorted(set(files)) if not _inside(f, dirs))


# One thread starts every sandbox and never ends (see the module's docstring).
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def spawn(start: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``start`` (which starts a sandboxed process) on the sandboxes' own thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aether-sandbox")
    return _spawner.submit(start, *args, **kwargs).result()


def probe(sandbox: Sandbox) -> str | None:
    """Run Python in the sandbox once: None if that works, else what went wrong."""
    with tempfile.TemporaryDirectory(prefix="aether-probe-") as workspace:
        argv = sandbox.argv(Path(workspace), [sys.executable, "-c", "pass"])
        try:
            result = subprocess.run(
                argv, env=sandbox.env, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
    if result.returncode == 0:
        return None
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"bwrap exited with status {result.returncode}"


@functools.lru_cache(maxsize=8)
def _checked(sandbox: Sandbox) -> str | None:
    return probe(sandbox)


def require_sandbox(settings: Settings) -> Sandbox | None:
    """The sandbox for approved code (None when ``oi_sandbox`` is ``none``), tried once per
    process. Raises SandboxUnavailable, naming the fix, when it cannot work here."""
    if settings.oi_sandbox == "none":
        return None
    fix = "install bubblewrap (apt-get install bubblewrap), or set AETHER_OI_SANDBOX=none"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "the agentic path runs approved code in a bubblewrap sandbox, but bwrap is not "
            f"installed: {fix} to run it unsandboxed"
        )
    sandbox = Sandbox.from_settings(settings, bwrap)
    problem = _checked(sandbox)
    if problem is not None:
        raise SandboxUnavailable(
            f"the agentic path runs approved code in a bubblewrap sandbox, but {bwrap} does not "
            f"work here ({problem}): {fix} to run it unsandboxed"
        )
    return sandbox
