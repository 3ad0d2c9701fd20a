"""Debian's nginx on a free loopback port in front of Aether nodes, with the shipped site
configuration (``deploy/nginx/aether.conf``): what the tests of several nodes and
``scripts/two_nodes.py`` put between a client and the nodes.

The site file is used as shipped, but for the addresses: its ``listen`` becomes this server's
loopback port, and its upstream's servers the nodes' ports. nginx starts as a daemon, so
``start`` returns once its socket listens (the starting process exits only then); ``stop``
ends it (fast). One worker process: new connections are handed to the nodes in turn.

@.architecture
role: test nginx server
jobs: [test_support]
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from aether.testing.redis_server import free_port

SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "aether.conf"


def _binary() -> str | None:
    """nginx on PATH, else where Debian puts it (/usr/sbin, not on every user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def nginx_available() -> bool:
    return _binary() is not None and SITE.is_file()


def site_for(listen_port: int, node_ports: list[int], site: str | None = None) -> str:
    """The shipped site configuration with this machine's addresses."""
    text = site if site is not None else SITE.read_text()
    upstream = re.search(r"upstream aether \{(.*?)\n\}", text, re.S)
    if upstream is None:
        raise ValueError("the site has no 'upstream aether' block")
    options = re.search(r"server 127\.0\.0\.1:\d+( [^;]*)?;", upstream.group(1))
    extra = (options.group(1) or "") if options else ""
    servers = "".join(f"\n    server 127.0.0.1:{port}{extra};" for port in node_ports)
    body = re.sub(r"\n\s*server 127\.0\.0\.1:\d+[^;]*;", "", upstream.group(1))
    text = text.replace(upstream.group(1), servers + body)
    return re.sub(r"listen \d+;", f"listen 127.0.0.1:{listen_port};", text, count=1)


class NginxServer:
    def __init__(self, node_ports: list[int]) -> None:
        self.port = free_port()
        self.node_ports = node_ports
        self.directory = Path(tempfile.mkdtemp(prefix="aether-nginx-"))
        self.running = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _configuration(self) -> Path:
        d = self.directory
        (d / "site.conf").write_text(site_for(self.port, self.node_ports))
        user = "user root;" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
"""
        )
        return d / "nginx.conf"

    def _nginx(self, *arguments: str) -> None:
        binary = _binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        result = subprocess.run(
            [binary, "-p", str(self.directory), "-e", str(self.directory / "error.log"),
             *arguments],
            capture_output=True,
            check=False,
            timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            log = self.directory / "error.log"
            raise RuntimeError(
                f"nginx {' '.join(arguments)} failed:\n{result.stderr.decode(errors='replace')}"
                + (log.read_text(errors="replace") if log.exists() else "")
            )

    def start(self) -> None:
        self._nginx("-c", str(self._configuration()))
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        pid = int((self.directory / "nginx.pid").read_text())
        os.kill(pid, signal.SIGTERM)  # fast shutdown

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
