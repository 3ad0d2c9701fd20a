#!/usr/bin/env python3
"""Check every module's ``@.architecture`` block against ``.architecture/job_types.yaml``.

Fails (exit 1) on a module without the block, a job that is not registered, a registered job
that no module uses, or a ``docs/ARCHITECTURE.md`` that no longer matches the code.
``--write`` regenerates ``docs/ARCHITECTURE.md`` from the blocks.

@.architecture
role: architecture validator
jobs: [validation, documentation_generation]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aether"
SCRIPTS = ROOT / "scripts"
REGISTRY = ROOT / ".architecture" / "job_types.yaml"
MAP = ROOT / "docs" / "ARCHITECTURE.md"

BLOCK = re.compile(
    r"@\.architecture\s*\n\s*role:\s*(?P<role>.+?)\s*\n\s*jobs:\s*\[(?P<jobs>[^\]]*)\]"
)

PIPELINES = """\
## Pipelines

WebSocket (primary channel):

```
client frame -> server/worker.py (Hypercorn, HTTP/1.1) -> ws/endpoint.py (reader)
  -> ws/handlers.py MessageHandler -> protocol/messages.py parse_client_message
  -> core/runtime/engine.py RuntimeEngine.run_chat (admission)
  -> core/runtime/turn.py ChatTurn: open, relay, seal, close (own nursery + CancelScope)
       producer: core/runtime/streaming.py ChatStreamer -> core/providers/{echo,http,oi}
       relay:    core/runtime/relay.py StreamRelay -> core/runtime/outbox.py Outbox
  -> ws/hub.py write_outbox (the client's writer; a frame's reply may leave from the reader,
     send_outbox_now, when the writer is idle and the socket takes it at once) -> client
```

REST / SSE:

```
POST /v1/chat, /v1/chat/stream -> app.py -> api/v1/router.py -> api/v1/endpoints/chat.py
  -> RuntimeEngine.run_chat (in the handler, or api/detached_chat.py DetachedChat for SSE)
  -> Outbox -> JSON / SSE body
```

Cancellation: `stop` -> MessageHandler -> RuntimeEngine.stop_generation ->
RequestTracker.cancel_request -> ChatTurn.seal queues the block end and `stopped` at once ->
the request's CancelScope is cancelled -> the producer (and the upstream stream) and the relay
stop; the relay queues nothing after the terminal.

Several workers (`python -m aether --workers N`, `AETHER_REDIS_URL`):

```
supervisor.py: binds the socket, starts N `python -m aether --listen-fd --worker-id` workers,
  replaces one that dies (its streaming answers marked interrupted), passes signals on
  └─ each worker: the whole pipeline above, with core/control/redis_plane.py as its
     RuntimeEngine.control (the embedded core/control/plane.py LocalControlPlane otherwise)
```

What the workers share goes through the control plane, never a delta: admission (per-caller
limit, duplicate ids, the conversation's turn marker: one script), the release after the final
save, stop and approve routed to the owner worker over its channel (`ROUTE` script, reply on
the asker's channel), "is your turn of this conversation saved" for a follow-up, the per-IP
token buckets and connection counts, and a lease per worker that makes a dead worker's entries
count for nothing. Redis unreachable: local work goes on, routed control answers 503, limits
fall back to each worker's share, and the next lease refresh registers everything again.
"""


@dataclass(frozen=True)
class Module:
    path: str
    role: str
    jobs: tuple[str, ...]


def read_registry(path: Path) -> dict[str, str]:
    """The registry is a flat ``job: meaning`` mapping (a YAML subset read without a YAML lib)."""
    jobs: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        name, sep, meaning = line.partition(":")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not meaning.strip():
            raise SystemExit(f"{path}:{number}: expected 'job_name: meaning'")
        if name in jobs:
            raise SystemExit(f"{path}:{number}: {name} registered twice")
        jobs[name] = meaning.strip().strip("\"'")
    return jobs


def read_modules() -> tuple[list[Module], list[str]]:
    modules: list[Module] = []
    problems: list[str] = []
    files = sorted(PACKAGE.rglob("*.py")) + sorted(SCRIPTS.rglob("*.py"))
    for file in files:
        rel = file.relative_to(ROOT).as_posix()
        docstring = ast.get_docstring(ast.parse(file.read_text(), rel)) or ""
        match = BLOCK.search(docstring)
        if match is None:
            problems.append(f"{rel}: no @.architecture block (role/jobs) in the module docstring")
            continue
        jobs = tuple(j.strip() for j in match["jobs"].split(",") if j.strip())
        if not jobs:
            problems.append(f"{rel}: @.architecture block lists no jobs")
        modules.append(Module(rel, match["role"], jobs))
    return modules, problems


def render_map(modules: list[Module], registry: dict[str, str]) -> str:
    lines = [
        "# Aether architecture map",
        "",
        "Generated by `python scripts/validate_job_types.py --write` from each module's",
        "`@.architecture` block; CI fails when it is stale. Do not edit by hand.",
        "",
        PIPELINES,
        "## Modules",
        "",
        "| module | role | jobs |",
        "|---|---|---|",
    ]
    for module in modules:
        lines.append(f"| `{module.path}` | {module.role} | {', '.join(module.jobs)} |")
    by_job: dict[str, list[str]] = defaultdict(list)
    for module in modules:
        for job in module.jobs:
            by_job[job].append(module.path)
    lines += ["", "## Files by responsibility", "", "| job | meaning | modules |", "|---|---|---|"]
    for job in sorted(registry):
        files = ", ".join(f"`{p}`" for p in by_job.get(job, []))
        lines.append(f"| {job} | {registry[job]} | {files} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate docs/ARCHITECTURE.md")
    args = parser.parse_args(argv)

    registry = read_registry(REGISTRY)
    modules, problems = read_modules()
    used = {job for module in modules for job in module.jobs}
    for module in modules:
        for job in module.jobs:
            if job not in registry:
                problems.append(f"{module.path}: job {job!r} is not in {REGISTRY.name}")
    for job in sorted(set(registry) - used):
        problems.append(f"{REGISTRY.name}: job {job!r} is registered but no module has it")

    rendered = render_map(modules, registry)
    if args.write:
        MAP.parent.mkdir(exist_ok=True)
        MAP.write_text(rendered)
        print(f"wrote {MAP.relative_to(ROOT)}")
    elif not MAP.exists() or MAP.read_text() != rendered:
        problems.append(
            f"{MAP.relative_to(ROOT)} is stale: run scripts/validate_job_types.py --write"
        )

    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"architecture ok: {len(modules)} modules, {len(registry)} job types")
    return 0


if __name__ == "__main__":
    sys.exit(main())
