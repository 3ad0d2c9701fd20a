"""The built-in chat page in a real headless browser (Debian's Chromium driven by Playwright).

Skipped, with a message, where no Chromium is installed: `apt-get install chromium` (Debian) and
the `dev` extra (Playwright) enable it. Screenshots are kept in `artifacts/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers import make_settings, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: `apt-get install chromium` to run the browser tests",
)
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def drive_page(base_url: str, scenario: Any) -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(base_url + "/")
            result = scenario(page)
            return result, errors
        finally:
            browser.close()


async def test_chat_streams_and_stop_ends_it_in_a_browser() -> None:
    message = " ".join(f"w{i}" for i in range(300))

    from playwright.sync_api import expect

    def scenario(page: Any) -> dict[str, Any]:
        page.wait_for_selector("#status:has-text('Connected')")
        page.fill("#message", "hello from the browser")
        page.keyboard.press("Enter")
        page.wait_for_selector("article.assistant[data-state='done']")
        first = page.inner_text("article.assistant .body")
        page.fill("#message", message)
        page.keyboard.press("Enter")
        # (No wait_for_function: the page's policy forbids evaluating strings, as it should.)
        expect(page.locator("article.assistant .body").nth(1)).to_contain_text("w5 ")
        page.click("#stop")
        page.wait_for_selector("article.assistant[data-state='(stopped)']")
        stopped = page.inner_text("article.assistant >> nth=1")
        page.wait_for_selector("#conversations li button")
        titles = page.locator("#conversations li button").all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        expect(page.locator("#conversations li button").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)
        return {"first": first, "stopped": stopped, "titles": titles}

    settings = make_settings(provider="echo", echo_token_delay_s=0.02)
    with trio.fail_after(60):
        async with running_server(settings) as server:
            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
            await server.state.engine.tracker.wait_until_idle()
    assert result["first"] == "hello from the browser"
    assert "(stopped)" in result["stopped"]
    assert "w5" in result["stopped"]
    assert "w299" not in result["stopped"]
    assert result["titles"] == ["hello from the browser"]
    assert errors == []
    assert (ARTIFACTS / "web-chat.png").stat().st_size > 1000


async def test_page_is_served_with_its_own_strict_policy() -> None:
    with trio.fail_after(10):
        async with (
            running_server(make_settings(provider="echo")) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            page = await client.get("/")
            script = await client.get("/static/app.js")
            missing = await client.get("/static/secret.py")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe" not in csp
    assert script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
