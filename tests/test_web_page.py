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

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import make_settings, needs_oi, running_server

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


@needs_oi
async def test_code_is_approved_from_the_keyboard_on_a_narrow_screen(fake_llm: FakeLLM) -> None:
    code = ("Let me compute it.\n", "```", "python\n", "print(6*7)\n", "```", "\n")
    fake_llm.script(Behaviour(reply=code), Behaviour(reply="The answer is 42."))
    width = 360

    from playwright.sync_api import expect

    def scenario(page: Any) -> dict[str, Any]:
        page.set_viewport_size({"width": width, "height": 740})
        page.wait_for_selector("#status:has-text('Connected')")
        page.focus("#message")
        page.keyboard.type("what is 6*7?")
        page.keyboard.press("Enter")
        approve = page.locator(".confirm button", has_text="Approve")
        # The question takes the focus (Enter answers it) once the model proposed code: the
        # first agentic turn imports Open Interpreter and starts a kernel, seconds on a busy VM.
        expect(approve).to_be_focused(timeout=45_000)
        proposed = page.locator("article.assistant pre.code").all_inner_texts()
        page.keyboard.press("Enter")
        page.wait_for_selector("article.assistant[data-state='done']")
        console = page.inner_text("article.assistant pre.console")
        answer = page.inner_text("article.assistant")
        texts = page.locator("article.assistant .body").all_inner_texts()
        boxes = [
            page.locator(selector).first.bounding_box()
            for selector in ("#message", "#stop", "article.assistant", "header")
        ]
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-approve-narrow.png"), full_page=True)
        return {
            "proposed": proposed,
            "console": console,
            "answer": answer,
            "texts": texts,
            "boxes": boxes,
        }

    settings = make_settings(provider="oi", llm_base_url=fake_llm.base_url, llm_model="fake-model")
    with trio.fail_after(60):
        async with running_server(settings) as server:
            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
            await server.state.engine.tracker.wait_until_idle()
    # The code is shown once, from its first line.
    assert [text.rstrip("\n") for text in result["proposed"]] == ["print(6*7)"]
    # The answer reads in the order it was written: text, code, output, text.
    assert [text.strip() for text in result["texts"]] == ["Let me compute it.", "The answer is 42."]
    assert "42" in result["console"]
    assert "(approved)" in result["answer"]
    assert "The answer is 42." in result["answer"]
    for box in result["boxes"]:  # nothing runs off a narrow screen
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= width
    assert errors == []


async def test_the_page_says_it_lost_the_connection_and_reconnects() -> None:
    from playwright.sync_api import expect

    settings = make_settings(provider="echo", echo_token_delay_s=0)
    with trio.fail_after(60):
        async with running_server(settings) as server:

            def scenario(page: Any) -> dict[str, Any]:
                status = page.locator("#status")
                expect(status).to_have_text("Connected")
                # The server drops every WebSocket, as a restart would.
                trio.from_thread.run_sync(server.hub.close_all, 1012, "restarting")
                expect(status).to_contain_text("reconnecting in")
                lost = status.inner_text()
                expect(status).to_have_text("Connected", timeout=10_000)
                page.fill("#message", "still there?")
                page.keyboard.press("Enter")
                page.wait_for_selector("article.assistant[data-state='done']")
                return {"lost": lost, "answer": page.inner_text("article.assistant .body")}

            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
    assert result["lost"].startswith("Disconnected")
    assert result["answer"] == "still there?"
    assert errors == []
