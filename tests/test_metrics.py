"""`GET /metrics`: Prometheus text that follows what the server did."""

from __future__ import annotations

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import make_settings, running_server, ws_client

DEADLINE_S = 10


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_follow_chats_stops_and_failures(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Behaviour(tokens=5), Behaviour(tokens=1000, delay_s=0.01), Behaviour(status=500)
    )
    settings = make_settings(
        provider="http", llm_base_url=fake_llm.base_url, llm_model="fake-model"
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            async with ws_client(server.ws_url) as client:
                await client.chat("one", id="done")
                await client.send({"type": "chat", "id": "stopped", "message": "two"})
                await client.wait_for("stopped", lambda m: m.get("content"))
                await client.send({"type": "stop", "id": "stopped"})
                await client.finish("stopped")
                await client.chat("three", id="failed")
                # A request is counted when it ends, a moment after its terminal went out
                # (its answer is stored first).
                await server.state.engine.tracker.wait_until_idle()
                during = samples((await rest.get("/metrics")).text)
            await server.hub.wait_until_empty()
            after = samples((await rest.get("/metrics")).text)
    assert during[("aether_websocket_connections", ())] == 1
    assert after[("aether_websocket_connections", ())] == 0
    path = (("path", "http"),)
    assert during[("aether_requests_total", (("outcome", "completed"), *path))] == 1
    assert during[("aether_requests_total", (("outcome", "stopped"), *path))] == 1
    assert during[("aether_requests_total", (("outcome", "error"), *path))] == 1
    assert during[("aether_requests_in_flight", path)] == 0
    assert during[("aether_upstream_errors_total", (("code", "upstream_http_error"),))] == 1
    assert during[("aether_time_to_first_token_seconds_count", path)] == 2
    assert during[("aether_stop_latency_seconds_count", (("reason", "stop"),))] == 1
    assert during[("aether_chunks_relayed_total", ())] >= 5 + 3


async def test_metrics_need_a_key_unless_public() -> None:
    locked = make_settings(provider="echo", api_keys="k-0123456789")
    public = make_settings(provider="echo", api_keys="k-0123456789", metrics_public=True)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(locked) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            refused = await rest.get("/metrics")
            allowed = await rest.get("/metrics", headers={"Authorization": "Bearer k-0123456789"})
        async with (
            running_server(public) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            open_metrics = await rest.get("/metrics")
    assert refused.status_code == 401
    assert allowed.status_code == 200
    assert open_metrics.status_code == 200
    assert "aether_requests_in_flight" in open_metrics.text
