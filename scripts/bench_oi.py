#!/usr/bin/env python3
"""The agentic path's costs: stop latency and memory per Open Interpreter instance.

Starts the fake upstream and ``python -m aether --provider oi`` as processes on loopback, then:

- ``stop``: in each of ``--stops`` new conversations, a chat streams slowly; once its first
  token arrives the client sends ``stop``. Reports stop -> ``stopped`` and stop -> upstream
  connection closed (the fake upstream records when the model stream's client went away), as
  p50/max, against the same figures on the HTTP path of the same server (the baseline);
- ``memory``: ``--conversations`` conversations each get one text turn (an interpreter each, no
  code run) and then one approved ``print`` (a Python kernel each); reports the server's RSS
  growth per interpreter and the kernels' RSS (separate processes) per conversation;
- ``first``: ``--fresh-starts`` times, a new server (its start timed to ``/ready``), then at
  once a first chat on the agentic path and one on the HTTP path (the baseline): chat -> first
  token for each, and the slowest ``GET /health`` (polled every 10 ms) while the agentic one
  ran (the event loop's stalls);
- ``sandbox``: with ``AETHER_OI_SANDBOX=bwrap`` and then ``none``, the first turn of
  ``--conversations`` new conversations: chat -> first token, and approve -> the code's first
  output (the conversation's kernel starts then), as p50/max, after one warm-up conversation.

    python scripts/bench_oi.py                 # about a minute on 2 cores

Needs the ``oi`` and ``bench`` extras.

@.architecture
role: agentic path benchmark
jobs: [benchmarking]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import DB_DIR, PY, Process, free_port, start_process

# The longest one workload may take on one server (a turn that never ends fails the run).
WORKLOAD_TIMEOUT_S = 300
# As a model's tokens split it: OI needs the fences as tokens of their own.
CODE_REPLY = ("Here.\n", "```", "python\n", "print('ok')\n", "```", "\n")


async def start_aether(upstream_url: str, sandbox: str = "bwrap") -> Process:
    port = free_port()
    argv = [PY, "-m", "aether", "--port", str(port), "--provider", "oi"]
    argv += ["--llm-base-url", upstream_url, "--llm-model", "fake-model", "--log-level", "WARNING"]
    env = {
        "AETHER_RATE_LIMIT_EXEMPT_IPS": "127.0.0.1",
        "AETHER_DB_PATH": str(DB_DIR / f"oi-{port}.sqlite3"),
        "AETHER_OI_AUTO_RUN": "false",
        "AETHER_OI_SANDBOX": sandbox,
    }
    return await start_process("aether-oi", argv, port, env)


async def stop_once(ws: Any, conversation: str, path: str) -> tuple[float, float]:
    """One chat stopped after its first token: (stop -> stopped, stop at monotonic)."""
    chat_message = {"type": "chat", "id": conversation, "message": conversation, "path": path}
    await ws.send_message(json.dumps({**chat_message, "conversation_id": conversation}))
    while True:
        message = json.loads(await ws.get_message())
        if message.get("id") == conversation and message.get("content"):
            break
    sent = time.monotonic()
    await ws.send_message(json.dumps({"type": "stop", "id": conversation}))
    while True:
        message = json.loads(await ws.get_message())
        if message.get("id") == conversation and message.get("type") == "stopped":
            return time.monotonic() - sent, sent


async def measure_stops(aether: Process, upstream: Process, stops: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    async with open_websocket_url(f"ws://127.0.0.1:{aether.port}/ws") as ws:
        await ws.get_message()  # hello
        for path in ("http", "oi"):
            latencies, sent_at = [], {}
            print(f"stop     {path}: {stops} chats", file=sys.stderr)
            for index in range(stops):
                conversation = f"stop-{path}-{index}"
                latency, sent = await stop_once(ws, conversation, path)
                latencies.append(latency * 1000)
                sent_at[conversation] = sent
            async with httpx.AsyncClient() as client:
                url = f"http://127.0.0.1:{upstream.port}/_fake/streams"
                records = (await client.get(url)).json()
            closed = [
                (r["client_closed_monotonic"] - sent_at[r["last_user_message"]]) * 1000
                for r in records
                if r.get("last_user_message") in sent_at and r.get("client_closed_monotonic")
            ]
            rows[path] = {
                "stop_p50_ms": statistics.median(latencies),
                "stop_max_ms": max(latencies),
                "upstream_closed_p50_ms": statistics.median(closed) if closed else float("nan"),
                "upstream_closed_max_ms": max(closed) if closed else float("nan"),
                "upstream_closed_count": len(closed),
            }
    return rows


def kernels_rss(process: psutil.Process) -> tuple[int, int]:
    children = [
        c
        for c in process.children(recursive=True)
        if "ipykernel" in " ".join(c.cmdline()) and c.name() != "bwrap"
    ]
    return len(children), sum(c.memory_info().rss for c in children)


def refused_or(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply``, unless it says the server refused a frame of ours (an error of no request):
    then the turn that frame was for would wait for ever."""
    if reply.get("type") == "error" and reply.get("id") is None:
        raise RuntimeError(f"the server refused a frame: {reply}")
    return reply


async def chat(ws: Any, conversation: str, message: str, run_code: bool) -> None:
    """One turn. The fake model proposes code every time: the first proposal is approved when
    ``run_code`` (its output goes back to the model, which proposes again), the rest denied."""
    request_id = f"{conversation}-{message}"
    await ws.send_message(
        json.dumps(
            {
                "type": "chat",
                "id": request_id,
                "message": message,
                "path": "oi",
                "conversation_id": conversation,
            }
        )
    )
    approve = run_code
    while True:
        reply = refused_or(json.loads(await ws.get_message()))
        if reply.get("id") != request_id:
            continue
        if reply.get("type") == "confirmation":
            answer = {
                "type": "approve",
                "id": request_id,
                "confirmation_id": reply["confirmation_id"],
                "approved": approve,
            }
            await ws.send_message(json.dumps(answer))
            approve = False
        if reply.get("type") in ("completion", "stopped", "error"):
            return


async def measure_memory(aether: Process, conversations: int) -> dict[str, Any]:
    handle = aether.psutil
    async with open_websocket_url(f"ws://127.0.0.1:{aether.port}/ws") as ws:
        await ws.get_message()
        await chat(ws, "warm-up", "hello", run_code=False)  # imports OI once
        await chat(ws, "warm-up", "run", run_code=True)  # and starts one kernel
        print(f"memory   {conversations} conversations", file=sys.stderr)
        before = handle.memory_info().rss
        kernels_before, kernel_rss_before = kernels_rss(handle)
        for index in range(conversations):
            await chat(ws, f"mem-{index}", "hello", run_code=False)
        after_text = handle.memory_info().rss
        for index in range(conversations):
            await chat(ws, f"mem-{index}", "run", run_code=True)
        after_code = handle.memory_info().rss
        kernels_after, kernel_rss_after = kernels_rss(handle)
    return {
        "conversations": conversations,
        "server_kib_per_interpreter": (after_text - before) / 1024 / conversations,
        "server_kib_per_interpreter_with_kernel": (after_code - before) / 1024 / conversations,
        "kernels_started": kernels_after - kernels_before,
        "kernel_mib_each": (kernel_rss_after - kernel_rss_before)
        / 2**20
        / max(1, kernels_after - kernels_before),
    }


async def first_turn(ws: Any, conversation: str) -> tuple[float, float]:
    """A new conversation's first turn, its code approved: (chat -> first token, approve ->
    the code's first output), in ms."""
    request_id = f"{conversation}-run"
    chat = {"type": "chat", "id": request_id, "message": "run", "conversation_id": conversation}
    sent = time.monotonic()
    await ws.send_message(json.dumps({**chat, "path": "oi"}))
    first_token = approved = output = None
    answered = False
    while True:
        reply = refused_or(json.loads(await ws.get_message()))
        if reply.get("id") != request_id:
            continue
        if first_token is None and reply.get("type") == "message" and reply.get("content"):
            first_token = time.monotonic()
        if reply.get("type") == "confirmation":
            # The fake model proposes code after every output: only the first one runs.
            answer = {
                "type": "approve",
                "id": request_id,
                "confirmation_id": reply["confirmation_id"],
                "approved": not answered,
            }
            await ws.send_message(json.dumps(answer))
            approved, answered = approved or time.monotonic(), True
        if output is None and reply.get("type") == "console" and reply.get("content"):
            output = time.monotonic()
        if reply.get("type") in ("completion", "stopped", "error"):
            break
    if first_token is None or approved is None or output is None:
        raise RuntimeError(f"{conversation}: the turn ended without code output: {reply}")
    return (first_token - sent) * 1000, (output - approved) * 1000


async def measure_sandbox(aether: Process, conversations: int) -> dict[str, float]:
    async with open_websocket_url(f"ws://127.0.0.1:{aether.port}/ws") as ws:
        await ws.get_message()
        await first_turn(ws, "warm-up")  # imports OI and starts a first kernel
        tokens, outputs = [], []
        for index in range(conversations):
            token_ms, output_ms = await first_turn(ws, f"sandbox-{index}")
            tokens.append(token_ms)
            outputs.append(output_ms)
    return {
        "first_token_p50_ms": statistics.median(tokens),
        "first_token_max_ms": max(tokens),
        "first_output_p50_ms": statistics.median(outputs),
        "first_output_max_ms": max(outputs),
    }


async def wait_ready(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with trio.fail_after(60):
            # Another process's state: there is no event to wait on, only its answer.
            while (await client.get("/ready")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)


async def first_token_ms(ws: Any, request_id: str, path: str) -> float:
    """A new conversation's first chat on ``path``: chat -> its first token, in ms."""
    chat = {"type": "chat", "id": request_id, "message": "hello", "path": path}
    sent = time.monotonic()
    await ws.send_message(json.dumps(chat))
    first: float | None = None
    while True:
        reply = json.loads(await ws.get_message())
        if reply.get("id") != request_id:
            continue
        if first is None and reply.get("type") == "message" and reply.get("content"):
            first = (time.monotonic() - sent) * 1000
        if reply.get("type") in ("completion", "stopped", "error"):
            if first is None:
                raise RuntimeError(f"{request_id}: no answer: {reply}")
            return first


async def watch_health(port: int, done: trio.Event, slowest: list[float]) -> None:
    """Append the slowest ``GET /health`` while ``done`` is not set (polled every 10 ms)."""
    worst = 0.0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        while not done.is_set():
            sent = time.monotonic()
            await client.get("/health")
            worst = max(worst, (time.monotonic() - sent) * 1000)
            await trio.sleep(0.01)
    slowest.append(worst)


async def measure_first(upstream_url: str, starts: int) -> dict[str, float]:
    rows: dict[str, list[float]] = {"ready_s": [], "oi": [], "http": [], "health": []}
    for index in range(starts):
        started = time.monotonic()
        aether = await start_aether(upstream_url, "none")
        try:
            await wait_ready(aether.port)
            rows["ready_s"].append(time.monotonic() - started)
            async with open_websocket_url(f"ws://127.0.0.1:{aether.port}/ws") as ws:
                await ws.get_message()
                done = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_health, aether.port, done, rows["health"])
                    rows["oi"].append(await first_token_ms(ws, f"first-oi-{index}", "oi"))
                    done.set()
                rows["http"].append(await first_token_ms(ws, f"first-http-{index}", "http"))
        finally:
            await aether.stop()
    return {
        "ready_s_p50": statistics.median(rows["ready_s"]),
        "oi_first_token_p50_ms": statistics.median(rows["oi"]),
        "oi_first_token_max_ms": max(rows["oi"]),
        "http_first_token_p50_ms": statistics.median(rows["http"]),
        "http_first_token_max_ms": max(rows["http"]),
        "health_max_ms": max(rows["health"]),
    }


async def start_upstream(*extra: str) -> Process:
    port = free_port()
    argv = [PY, "-m", "aether.testing.fake_llm", "--port", str(port), *extra]
    return await start_process("upstream", argv, port, {})


async def first_turns(starts: int) -> dict[str, float]:
    upstream = await start_upstream("--tokens", "5", "--delay-ms", "5")
    try:
        print(f"first    {starts} fresh starts", file=sys.stderr)
        return await measure_first(f"http://127.0.0.1:{upstream.port}/v1", starts)
    finally:
        await upstream.stop()


def print_first(first: dict[str, float], starts: int) -> None:
    ready = first["ready_s_p50"]
    print(f"\nfirst turn after a fresh start ({starts} starts; ready in {ready:.1f} s p50)\n")
    print("| path | first token p50 ms | max ms | slowest GET /health during it, ms |")
    print("|---|---|---|---|")
    print(
        f"| oi | {first['oi_first_token_p50_ms']:.1f} | {first['oi_first_token_max_ms']:.1f} | "
        f"{first['health_max_ms']:.1f} |"
    )
    print(
        f"| http | {first['http_first_token_p50_ms']:.1f} | "
        f"{first['http_first_token_max_ms']:.1f} | |"
    )


async def main(args: argparse.Namespace) -> None:
    if args.only_first:
        print_first(await first_turns(args.fresh_starts), args.fresh_starts)
        return
    # Stops: a long, slow answer. Memory: every answer proposes code (see ``chat``).
    upstream = await start_upstream("--tokens", "2000", "--delay-ms", "20")
    try:
        aether = await start_aether(f"http://127.0.0.1:{upstream.port}/v1")
        try:
            stops = await measure_stops(aether, upstream, args.stops)
        finally:
            await aether.stop()
    finally:
        await upstream.stop()
    first = await first_turns(args.fresh_starts)
    upstream = await start_upstream(*(f"--reply-piece={piece}" for piece in CODE_REPLY))
    try:
        aether = await start_aether(f"http://127.0.0.1:{upstream.port}/v1")
        try:
            with trio.fail_after(WORKLOAD_TIMEOUT_S):
                memory = await measure_memory(aether, args.conversations)
        finally:
            await aether.stop()
        sandboxes = {}
        for sandbox in ("bwrap", "none"):
            print(f"sandbox  {sandbox}: {args.conversations} first turns", file=sys.stderr)
            aether = await start_aether(f"http://127.0.0.1:{upstream.port}/v1", sandbox)
            try:
                with trio.fail_after(WORKLOAD_TIMEOUT_S):
                    sandboxes[sandbox] = await measure_sandbox(aether, args.conversations)
            finally:
                await aether.stop()
    finally:
        await upstream.stop()
    machine = f"{platform.node()}: {psutil.cpu_count()} cores, Python {platform.python_version()}"
    print(f"# bench_oi ({machine})\n")
    print("| path | stop p50 ms | stop max ms | upstream closed p50 ms | upstream closed max ms |")
    print("|---|---|---|---|---|")
    for path, row in stops.items():
        print(
            f"| {path} | {row['stop_p50_ms']:.1f} | {row['stop_max_ms']:.1f} | "
            f"{row['upstream_closed_p50_ms']:.1f} | {row['upstream_closed_max_ms']:.1f} |"
        )
    print(
        f"\nmemory, {memory['conversations']} conversations: server "
        f"{memory['server_kib_per_interpreter']:,.0f} KiB per interpreter (text turns), "
        f"{memory['server_kib_per_interpreter_with_kernel']:,.0f} KiB once each ran code; "
        f"{memory['kernels_started']} Python kernels, {memory['kernel_mib_each']:.1f} MiB each"
    )
    print_first(first, args.fresh_starts)
    print("\n| sandbox | first token p50 ms | max | approve -> first output p50 ms | max |")
    print("|---|---|---|---|---|")
    for sandbox, row in sandboxes.items():
        print(
            f"| {sandbox} | {row['first_token_p50_ms']:.0f} | {row['first_token_max_ms']:.0f} | "
            f"{row['first_output_p50_ms']:.0f} | {row['first_output_max_ms']:.0f} |"
        )
    if args.json:
        await trio.Path(args.json).write_text(
            json.dumps(
                {"stops": stops, "memory": memory, "first": first, "sandbox": sandboxes}, indent=2
            )
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=10)
    parser.add_argument("--conversations", type=int, default=5)
    parser.add_argument("--fresh-starts", type=int, default=3)
    parser.add_argument(
        "--only-first", action="store_true", help="measure only the first turns after a start"
    )
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
