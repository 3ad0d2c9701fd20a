"""The built-in chat page in a real headless browser (Debian's Chromium driven by Playwright).

Skipped, with a message, where no Chromium is installed: `apt-get install chromium` (Debian) and
the `dev` extra (Playwright) enable it. Screenshots, and each accessibility audit's full result
(axe-core, from the copy in `tests/vendor/`), are kept in `artifacts/`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import make_settings, needs_oi, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
STATIC = ROOT / "aether" / "web" / "static"
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
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
DESKTOP = 1000
NARROW = 360


def drive_page(
    base_url: str,
    scenario: Any,
    *,
    width: int = DESKTOP,
    height: int = 700,
    bypass_csp: bool = False,
    clipboard: bool = False,
) -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": width, "height": height},
                bypass_csp=bypass_csp,
                permissions=["clipboard-read", "clipboard-write"] if clipboard else [],
            )
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
            page.goto(base_url + "/")
            result = scenario(page)
            return result, errors
        finally:
            browser.close()


def audit(page: Any, name: str) -> list[dict[str, Any]]:
    """Run axe-core on the page as it is now; keep the whole result in `artifacts/axe-<name>.json`
    and return the serious and critical violations."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        # Evaluated by the driver, not by the page: its policy does not apply (and stays strict).
        page.evaluate(AXE.read_text())
    result = page.evaluate(
        """async () => {
            const r = await axe.run(document, {resultTypes: ["violations"]});
            return {
                violations: r.violations.map((v) => ({
                    id: v.id, impact: v.impact, help: v.help,
                    nodes: v.nodes.map((n) => n.target.join(" ")),
                })),
                passes: r.passes.length,
                incomplete: r.incomplete.map((v) => ({
                    id: v.id, nodes: v.nodes.map((n) => n.target.join(" ")),
                })),
            };
        }"""
    )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"axe-{name}.json").write_text(json.dumps(result, indent=2))
    return [v for v in result["violations"] if v["impact"] in ("serious", "critical")]


def tab_to(page: Any, selector: str, key: str = "Tab", limit: int = 40) -> None:
    """Press Tab (or Shift+Tab) until the focus is on `selector`, as a keyboard user would."""
    for _ in range(limit):
        page.keyboard.press(key)
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{key} never reached {selector}")


def last_line(page: Any) -> dict[str, float]:
    """Where the transcript's last element is, against the transcript and the composer."""
    return page.evaluate(
        """() => {
            const t = document.getElementById("transcript");
            const view = t.getBoundingClientRect();
            const composer = document.getElementById("composer").getBoundingClientRect();
            let node = document.getElementById("turns").lastElementChild;
            while (node.lastElementChild) node = node.lastElementChild;
            const box = node.getBoundingClientRect();
            return {
                top: box.top, bottom: box.bottom, view_top: view.top, view_bottom: view.bottom,
                composer_top: composer.top, composer_bottom: composer.bottom,
                window: window.innerHeight,
                unscrolled: t.scrollHeight - t.scrollTop - t.clientHeight,
                page: document.documentElement.scrollHeight,
            };
        }"""
    )


def assert_in_view(where: dict[str, float]) -> None:
    assert where["view_top"] <= where["top"] + 1
    assert where["bottom"] <= where["view_bottom"] + 1, where
    assert where["view_bottom"] <= where["composer_top"] + 1, where
    assert where["composer_bottom"] <= where["window"] + 1, where
    assert where["unscrolled"] <= 1, where
    # Only the transcript scrolls: nothing in it reaches out below the page.
    assert where["page"] <= where["window"], where


def http_settings(fake: FakeLLM) -> Any:
    return make_settings(provider="http", llm_base_url=fake.base_url, llm_model="fake-model")


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
        page.wait_for_selector("#conversations li button.open")
        titles = page.locator("#conversations li button.open").all_inner_texts()
        ARTIFACTS.mkdir(exist_ok=True)
        expect(page.locator("#conversations li button.open").first).to_be_visible()
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
        blocking = audit(page, "confirmation-narrow")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-confirm-narrow.png"))
        expect(approve).to_be_focused()
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
            "blocking": blocking,
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
    assert result["blocking"] == []
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


# An answer long enough to be cut mid-way: numbered words, so any gap or repeat shows.
NUMBERED = "".join(f"w{index:03d} " for index in range(160))


async def test_an_answer_goes_on_whole_after_a_dropped_connection_and_a_reload(
    fake_llm: FakeLLM,
) -> None:
    from playwright.sync_api import expect

    fake_llm.script(*[Behaviour(reply=NUMBERED, piece_chars=5, delay_s=0.01)] * 2)
    settings = make_settings(
        provider="http", llm_base_url=fake_llm.base_url, llm_model="fake-model", resume_grace_s=10
    )

    def answer_text(page: Any) -> str:
        return " ".join(page.locator("article.assistant .body").last.inner_text().split())

    with trio.fail_after(90):
        async with running_server(settings) as server:

            def scenario(page: Any) -> dict[str, Any]:
                status = page.locator("#status")
                expect(status).to_have_text("Connected")
                page.fill("#message", "count")
                page.keyboard.press("Enter")
                answer = page.locator("article.assistant").last
                expect(answer).to_contain_text("w020")
                # The server drops every WebSocket mid-answer, as a restart or a network would.
                trio.from_thread.run_sync(server.hub.close_all, 1012, "restarting")
                expect(status).to_contain_text("the answer continues")
                lost = status.inner_text()
                page.wait_for_selector("article.assistant[data-state='done']")
                dropped = answer_text(page)
                # A second answer, and the page reloaded in the middle of it.
                page.fill("#message", "count again")
                page.keyboard.press("Enter")
                expect(page.locator("article.assistant").nth(1)).to_contain_text("w030")
                page.reload()
                page.wait_for_selector("article.assistant:nth-of-type(4)[data-state='done']")
                return {
                    "lost": lost,
                    "dropped": dropped,
                    "reloaded": answer_text(page),
                    "turns": page.locator("article").count(),
                    "users": page.locator("article.user .body").all_inner_texts(),
                    "first": " ".join(
                        page.locator("article.assistant .body").first.inner_text().split()
                    ),
                }

            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
    whole = NUMBERED.strip()
    assert result["lost"].startswith("Disconnected")
    assert result["dropped"] == whole
    assert result["reloaded"] == whole
    assert result["first"] == whole  # the stored first answer, shown after the reload
    assert (result["turns"], result["users"]) == (4, ["count", "count again"])
    assert [stream.outcome for stream in fake_llm.streams] == ["completed", "completed"]
    assert errors == []


def _vendor_sums() -> dict[str, str]:
    readme = (STATIC / "vendor" / "README.md").read_text()
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)}


async def test_the_vendored_libraries_are_served_as_pinned_and_nothing_else_is() -> None:
    sums = _vendor_sums()
    shipped = sorted(
        str(path.relative_to(STATIC))
        for path in STATIC.rglob("*")
        if path.is_file() and path.name != "README.md"
    )
    html = (STATIC / "index.html").read_text()
    referenced = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    probes = [
        "/static/vendor/README.md",
        "/static/vendor/../app.js",
        "/static/vendor/%2e%2e/app.js",
        "/static/vendor/..%2F..%2F..%2Fapi%2Fweb.py",
        "/static/vendor%2Fpurify.min.js",
        "/static/..%2Fapi%2Fweb.py",
        "/static/vendor/",
        "/static/vendor/index.html",
    ]
    with trio.fail_after(20):
        async with (
            running_server(make_settings(provider="echo")) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            served = {
                name: await client.get("/static/" + name if name != "index.html" else "/")
                for name in shipped
            }
            refused = {probe: await client.get(probe) for probe in probes}
    assert set(referenced) <= set(shipped)
    assert {"vendor/markdown-it.umd.min.js", "vendor/purify.min.js"} <= set(referenced)
    for name, response in served.items():
        assert response.status_code == 200, name
        assert response.content == (STATIC / name).read_bytes()
        assert "unsafe" not in response.headers["content-security-policy"]
        expected = {
            ".js": "text/javascript",
            ".css": "text/css",
            ".txt": "text/plain",
            ".html": "text/html",
        }
        suffix = Path(name).suffix
        assert response.headers["content-type"].startswith(expected[suffix]), name
    # The libraries are the pinned builds the vendor README names.
    assert set(sums) == {Path(n).name for n in referenced if n.startswith("vendor/")}
    for name, digest in sums.items():
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest
    listed = {response.content for response in served.values()}
    for probe, response in refused.items():
        # Whatever a path says, only the listed files answer (a client that resolves "../" or
        # "%2F" itself asks for one of them).
        assert response.status_code == 404 or response.content in listed, probe
    assert refused["/static/vendor/README.md"].status_code == 404
    assert refused["/static/..%2Fapi%2Fweb.py"].status_code == 404
    # The wheel ships every one of them.
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["aether.web"]
    for name in shipped:
        assert any(fnmatch.fnmatch("static/" + name, glob) for glob in globs), name


MARKDOWN_ANSWER = (
    "# Plan\n\n"
    "Here is **the plan**, with `inline code` and a [documented link](https://example.com/docs).\n\n"
    "1. First step\n2. Second step\n3. Third step\n\n"
    "| name | value |\n|:--|--:|\n| answer | 42 |\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    + "".join(
        f"Step {i}: one more line of a long answer that has to scroll.\n\n" for i in range(40)
    )
    + "```sh\necho the end\n```\n"
)


@pytest.mark.parametrize("width", [DESKTOP, NARROW])
async def test_answers_render_as_markdown_while_they_stream(fake_llm: FakeLLM, width: int) -> None:
    fake_llm.script(Behaviour(reply=MARKDOWN_ANSWER, piece_chars=8, delay_s=0.015))

    from playwright.sync_api import expect

    def scenario(page: Any) -> dict[str, Any]:
        page.wait_for_selector("#status:has-text('Connected')")
        expect(page.locator("#empty-path")).to_contain_text("fake-model")
        page.fill("#message", "make a plan")
        page.keyboard.press("Enter")
        answer = page.locator("article.assistant")
        # Rendered while it streams: the heading, the list and the highlighted code are there
        # before the answer ends.
        expect(answer.locator(".hljs-keyword").first).to_have_text("def")
        expect(answer.locator("p", has_text="Step 5:")).to_be_visible()
        streaming = answer.get_attribute("aria-busy") == "true"
        during = last_line(page)
        blocking = {"streaming": audit(page, f"streaming-{width}")}
        page.screenshot(path=str(ARTIFACTS / f"web-markdown-{width}.png"))
        # The reader scrolls up: the page stops following, offers a way back, and keeps the
        # reader's place while the answer goes on.
        page.hover("#transcript")
        page.mouse.wheel(0, -300)
        expect(page.locator("#jump")).to_be_visible()
        expect(answer.locator("p", has_text="Step 25:")).to_be_visible()
        held = last_line(page)
        page.click("#jump")
        page.wait_for_selector("article.assistant[data-state='done']")
        after = last_line(page)
        code_box = answer.locator(".codeblock").first
        code_box.locator("button.copy").focus()
        page.keyboard.press("Enter")
        expect(code_box.locator("button.copy .said")).to_have_text("Copied")
        copied = page.evaluate("() => navigator.clipboard.readText()")
        link = answer.locator("a", has_text="documented link")
        if width == DESKTOP:
            page.emulate_media(color_scheme="dark")
            blocking["dark"] = audit(page, "done-dark")
            page.screenshot(path=str(ARTIFACTS / "web-markdown-dark.png"))
        return {
            "streaming": streaming,
            "during": during,
            "held": held,
            "after": after,
            "blocking": blocking,
            "heading": answer.locator(".md h2").inner_text(),
            "items": answer.locator(".md ol li").all_inner_texts(),
            "cells": answer.locator(".md td").all_inner_texts(),
            "right": answer.locator(".md td.align-right").all_inner_texts(),
            "code": code_box.locator("pre code").inner_text(),
            "language": code_box.locator(".code-head .lang").inner_text(),
            "copied": copied,
            "link": [link.get_attribute(a) for a in ("href", "target", "rel")],
            "inline_code": answer.locator(".md p code").first.inner_text(),
            "meta": answer.locator(".who").inner_text(),
            "label": answer.get_attribute("aria-label"),
            "user_label": page.locator("article.user").get_attribute("aria-label"),
            "you": page.locator("article.user .who").inner_text(),
        }

    with trio.fail_after(60):
        async with running_server(http_settings(fake_llm)) as server:
            result, errors = await trio.to_thread.run_sync(
                lambda: drive_page(server.base_url, scenario, width=width, clipboard=True)
            )
    assert result["streaming"]
    assert result["blocking"] == {key: [] for key in result["blocking"]}
    assert result["heading"] == "Plan"
    assert result["items"] == ["First step", "Second step", "Third step"]
    assert result["cells"] == ["answer", "42"]
    assert result["right"] == ["42"]
    assert result["code"].rstrip("\n") == "def add(a, b):\n    return a + b"
    assert result["language"] == "python"
    assert result["copied"].rstrip("\n") == "def add(a, b):\n    return a + b"
    assert result["link"] == ["https://example.com/docs", "_blank", "noopener noreferrer"]
    assert result["inline_code"] == "inline code"
    # Who answered, and by which path; the two roles read differently.
    assert "Aether" in result["meta"]
    assert "via the http path · fake-model" in result["meta"]
    assert result["label"] == "Aether, via the http path, model fake-model"
    assert result["user_label"] == "You"
    assert result["you"] == "You"
    # The transcript follows the stream to its last line, above the composer, at this width...
    assert_in_view(result["during"])
    # ...but not while the reader has scrolled up...
    assert result["held"]["unscrolled"] > 100
    # ...and again once asked to, to the answer's end.
    assert_in_view(result["after"])
    assert errors == []


# Model output that would run script if the page let it: each payload sets window.__pwned or
# changes the title. Around them, markdown that must still render.
HOSTILE_ANSWER = """# Safe heading

- item one
- item **two**

A [documented link](https://example.com/docs) and `inline code`.

<script>window.__pwned = "script"; document.title = "pwned"</script>

<img src="x" onerror="window.__pwned = 'img'; document.title = 'pwned'">

[click me](javascript:window.__pwned='link') [case](JaVaScRiPt:window.__pwned='case')
[entity](jav&#x09;ascript:window.__pwned='entity') <javascript:window.__pwned='autolink'>
[data](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX19wd25lZD0xPC9zY3JpcHQ+)

<a href="javascript:window.__pwned='raw-a'">raw link</a>

<svg onload="window.__pwned = 'svg'; document.title = 'pwned'"></svg>

<svg><script>window.__pwned = 'svg-script'</script></svg>

<iframe src="javascript:top.__pwned='iframe'"></iframe>

<style>body { display: none }</style>

![tracker](https://example.com/pixel.png) ![bad](javascript:window.__pwned='image')

```html
<script>window.__pwned = "code"</script>
```
"""
# Elements no answer may hold, whatever its text.
DANGEROUS_TAGS = [
    "script",
    "img",
    "svg",
    "iframe",
    "object",
    "embed",
    "style",
    "link",
    "form",
    "input",
    "math",
    "base",
    "meta",
]
# The same attacks straight at the sanitiser, as a second layer behind markdown-it (which shows
# HTML as text): what DOMPurify lets through must be just as harmless.
RAW_HTML = (
    "<p onclick=\"window.__pwned='attr'\">text</p>"
    '<a href="javascript:window.__pwned=\'href\'">a</a><a href="/v1/conversations">relative</a>'
    "<img src=x onerror=\"window.__pwned='img'\"><svg onload=\"window.__pwned='svg'\"></svg>"
    "<svg><script>window.__pwned='svg-script'</script></svg><math><mi>x</mi></math>"
    '<form action=https://example.com><input name=q></form><a href="https://ok.example">ok</a>'
)


@pytest.mark.parametrize("csp", ["with-csp", "without-csp"])
async def test_model_output_cannot_run_script_in_the_page(fake_llm: FakeLLM, csp: str) -> None:
    """Without the page's policy too: the sanitiser alone must hold, the policy is a second wall."""
    fake_llm.script(Behaviour(reply=HOSTILE_ANSWER, piece_chars=7))

    def scenario(page: Any) -> dict[str, Any]:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.wait_for_selector("#status:has-text('Connected')")
        page.fill("#message", "show me everything")
        page.keyboard.press("Enter")
        # (Attached, not visible: a payload that hid the page must fail the asserts, not this.)
        page.wait_for_selector("article.assistant[data-state='done']", state="attached")
        answer = page.locator("article.assistant")
        page.screenshot(path=str(ARTIFACTS / f"web-hostile-{csp}.png"), full_page=True)
        inspected = page.evaluate(
            """(tags) => {
                const turns = document.getElementById("turns");
                const all = Array.from(turns.querySelectorAll("*"));
                const attributes = (e) => Array.from(e.attributes).map((a) => a.name);
                return {
                    pwned: window.__pwned === undefined ? null : String(window.__pwned),
                    title: document.title,
                    dangerous: all.map((e) => e.localName).filter((name) => tags.includes(name)),
                    handlers: all.flatMap((e) => attributes(e)
                        .filter((name) => name.startsWith("on") || name === "style")
                        .map((name) => e.localName + "@" + name)),
                    hrefs: Array.from(turns.querySelectorAll("[href]"), (e) => e.href),
                    body_visible: getComputedStyle(document.body).display !== "none",
                };
            }""",
            DANGEROUS_TAGS,
        )
        sanitized = page.evaluate(
            """(html) => {
                const holder = document.createElement("div");
                holder.append(sanitized(html));
                return holder.innerHTML;
            }""",
            RAW_HTML,
        )
        return {
            **inspected,
            "sanitized": sanitized,
            "text": answer.locator(".md").first.inner_text(),
            "items": answer.locator(".md ul li").all_inner_texts(),
            "heading": answer.locator(".md h2").inner_text(),
            "offsite": [url for url in requests if not url.startswith("http://127.0.0.1")],
        }

    with trio.fail_after(60):
        async with running_server(http_settings(fake_llm)) as server:
            result, errors = await trio.to_thread.run_sync(
                lambda: drive_page(server.base_url, scenario, bypass_csp=csp == "without-csp")
            )
    assert result["pwned"] is None
    assert result["title"] == "Aether"
    assert result["body_visible"]
    assert result["dangerous"] == []
    assert result["handlers"] == []
    # Every link left is an https one; a picture is a link to it, not loaded.
    assert result["hrefs"] == ["https://example.com/docs", "https://example.com/pixel.png"]
    assert result["offsite"] == []
    # Ordinary markdown still renders; the HTML shows as the text it is.
    assert result["heading"] == "Safe heading"
    assert result["items"] == ["item one", "item two"]
    assert "<script>window.__pwned" in result["text"]
    assert "<svg onload=" in result["text"]
    assert "Image: tracker" in result["text"]
    # The second layer alone: no handler, no script, no svg, no form, no relative link.
    assert result["sanitized"] == (
        "<p>text</p><a>a</a><a>relative</a>"
        '<a href="https://ok.example" target="_blank" rel="noopener noreferrer">ok</a>'
    )
    # Nothing was even refused by the page's policy: the payloads never reached the DOM.
    assert errors == []


async def test_an_empty_page_then_an_error_that_says_what_to_do(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(status=503), Behaviour(reply="All **good** now."))

    from playwright.sync_api import expect

    def scenario(page: Any) -> dict[str, Any]:
        page.wait_for_selector("#status:has-text('Connected')")
        expect(page.locator("#empty-path")).to_contain_text("http path")
        blocking = {"empty": audit(page, "empty")}
        page.screenshot(path=str(ARTIFACTS / "web-empty.png"))
        empty = page.locator("#empty").inner_text()
        paths = page.locator("#path option").all_inner_texts()
        page.fill("#message", "hello")
        page.keyboard.press("Enter")
        page.wait_for_selector("article.assistant[data-state='error']")
        error = page.locator("article.assistant .note.error")
        blocking["error"] = audit(page, "error")
        page.screenshot(path=str(ARTIFACTS / "web-error.png"))
        failed = {"text": error.inner_text(), "role": error.get_attribute("role")}
        page.fill("#message", "again")
        page.keyboard.press("Enter")
        second = page.locator("article.assistant").nth(1)
        expect(second).to_have_attribute("data-state", "done")
        return {
            "blocking": blocking,
            "empty": empty,
            "empty_hidden": page.locator("#empty").is_hidden(),
            "paths": paths,
            "failed": failed,
            "answer": second.locator(".md").inner_text(),
            "bold": second.locator(".md strong").inner_text(),
        }

    with trio.fail_after(60):
        async with running_server(http_settings(fake_llm)) as server:
            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
    assert result["blocking"] == {"empty": [], "error": []}
    assert "Enter" in result["empty"]
    assert "Esc" in result["empty"]
    assert "http path (the model server, fake-model)" in result["empty"]
    assert result["empty_hidden"]
    assert result["paths"][0] == "default (http)"
    assert "http: the model server" in result["paths"]
    # The code, what it means and what to try, and the server's own words.
    assert "upstream_http_error" in result["failed"]["text"]
    assert "The model server refused the request" in result["failed"]["text"]
    assert "HTTP 503" in result["failed"]["text"]
    assert result["failed"]["role"] == "alert"
    assert result["answer"] == "All good now."
    assert result["bold"] == "good"
    assert errors == []


async def test_the_keyboard_alone_chats_stops_and_keeps_the_side_panel() -> None:
    long_message = " ".join(f"w{i}" for i in range(300))

    from playwright.sync_api import expect

    def focused(page: Any, selector: str) -> None:
        expect(page.locator(selector)).to_be_focused()

    def scenario(page: Any) -> dict[str, Any]:
        page.wait_for_selector("#status:has-text('Connected')")
        page.keyboard.press("Tab")
        focused(page, "a.skip")
        page.keyboard.press("Enter")
        focused(page, "#message")
        # Send with Enter.
        page.keyboard.type("first question")
        page.keyboard.press("Enter")
        page.wait_for_selector("article.assistant[data-state='done']")
        # Stop with Esc.
        page.fill("#message", long_message)
        page.keyboard.press("Enter")
        expect(page.locator("article.assistant").nth(1).locator(".body")).to_contain_text("w5 ")
        page.keyboard.press("Escape")
        page.wait_for_selector("article.assistant[data-state='(stopped)']")
        focused(page, "#message")
        # A new chat, from the side panel.
        tab_to(page, "#new-chat", "Shift+Tab")
        page.keyboard.press("Enter")
        expect(page.locator("#empty")).to_be_visible()
        focused(page, "#message")
        page.keyboard.type("second question")
        page.keyboard.press("Enter")
        page.wait_for_selector("article.assistant[data-state='done']")
        expect(page.locator("#conversations li")).to_have_count(2)
        # Through the list with the arrow keys; Enter opens a conversation.
        tab_to(page, "#conversations button.open", "Shift+Tab")
        page.keyboard.press("Home")
        focused(page, "#conversations li:first-child button.open")
        page.keyboard.press("ArrowDown")
        focused(page, "#conversations li:nth-child(2) button.open")
        page.keyboard.press("Enter")
        expect(page.locator("article.user .body").first).to_have_text("first question")
        reopened = page.locator("article.turn").all_inner_texts()
        focused(page, "#message")
        # Delete asks first; Esc keeps the conversation.
        tab_to(page, "#conversations button.open[aria-current='true']", "Shift+Tab")
        page.keyboard.press("Delete")
        dialog = page.locator("#confirm-delete")
        expect(dialog).to_be_visible()
        focused(page, "#cancel-delete")
        asked = page.locator("#confirm-delete-text").inner_text()
        blocking = audit(page, "delete-dialog")
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        focused(page, "#conversations li:nth-child(2) button.delete")
        expect(page.locator("#conversations li")).to_have_count(2)
        # Enter on the delete button, Tab to Delete, Enter: gone, here and on the server.
        page.keyboard.press("Enter")
        expect(dialog).to_be_visible()
        page.keyboard.press("Tab")
        focused(page, "#do-delete")
        page.keyboard.press("Enter")
        expect(page.locator("#conversations li")).to_have_count(1)
        focused(page, "#conversations li:first-child button.open")
        return {
            "reopened": reopened,
            "asked": asked,
            "blocking": blocking,
            "left": page.locator("#conversations button.open").all_inner_texts(),
            "empty": page.locator("#empty").is_visible(),
            "turns": page.locator("article.turn").count(),
        }

    settings = make_settings(provider="echo", echo_token_delay_s=0.02)
    with trio.fail_after(60):
        async with running_server(settings) as server:
            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
            await server.state.engine.tracker.wait_until_idle()
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                stored = (await client.get("/v1/conversations")).json()["conversations"]
    assert len(result["reopened"]) == 4
    assert "first question" in result["reopened"][1]
    assert "(stopped)" in result["reopened"][3]
    assert "first question" in result["asked"]
    assert result["blocking"] == []
    assert result["left"] == ["second question"]
    # The open conversation was the one deleted: the page is back to its empty state.
    assert result["empty"]
    assert result["turns"] == 0
    assert [c["title"] for c in stored] == ["second question"]
    assert errors == []


async def test_a_conversation_is_renamed_from_the_side_panel() -> None:
    from playwright.sync_api import expect

    def scenario(page: Any) -> dict[str, Any]:
        page.wait_for_selector("#status:has-text('Connected')")
        page.fill("#message", "first title")
        page.keyboard.press("Enter")
        page.wait_for_selector("article.assistant[data-state='done']")
        row = page.locator("#conversations li").first
        expect(row.locator("button.open")).to_have_text("first title")
        # F2 on the focused conversation opens the dialog with its title selected.
        row.locator("button.open").focus()
        page.keyboard.press("F2")
        dialog = page.locator("#rename")
        expect(dialog).to_be_visible()
        offered = page.locator("#rename-title").input_value()
        blocking = audit(page, "rename-dialog")
        # Esc keeps the title.
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        expect(row.locator("button.open")).to_have_text("first title")
        # The ✎ button, a new title, Enter: renamed here and on the server.
        row.locator("button.rename").click()
        page.keyboard.type("  Trip to Lyon ")
        page.keyboard.press("Enter")
        expect(page.locator("#conversations li button.open").first).to_have_text("Trip to Lyon")
        focused = page.evaluate("() => document.activeElement.textContent")
        return {"offered": offered, "blocking": blocking, "focused": focused}

    settings = make_settings(provider="echo", echo_token_delay_s=0.0)
    with trio.fail_after(60):
        async with running_server(settings) as server:
            result, errors = await trio.to_thread.run_sync(drive_page, server.base_url, scenario)
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                stored = (await client.get("/v1/conversations")).json()["conversations"]
    assert result["offered"] == "first title"
    assert result["blocking"] == []
    assert result["focused"] == "Trip to Lyon"
    assert [c["title"] for c in stored] == ["Trip to Lyon"]
    assert errors == []


@pytest.mark.parametrize("width", [DESKTOP, NARROW])
async def test_the_page_offers_the_servers_models(
    fake_llm: FakeLLM, nursery: trio.Nursery, width: int
) -> None:
    second = FakeLLM(Behaviour(reply="From the second model.", delay_s=0), model="up-2")
    await nursery.start(second.serve)
    fake_llm.script(Behaviour(reply="From the first model.", delay_s=0))

    from playwright.sync_api import expect

    def scenario(page: Any) -> dict[str, Any]:
        page.wait_for_selector("#status:has-text('Connected')")
        expect(page.locator("#model")).to_be_visible()
        options = page.locator("#model option").all_inner_texts()
        page.fill("#message", "hello")
        page.keyboard.press("Enter")
        first = page.locator("article.assistant").nth(0)
        expect(first).to_have_attribute("data-state", "done")
        # Chosen from the keyboard, as the selector's label names it.
        tab_to(page, "#model", "Shift+Tab")
        page.keyboard.press("ArrowDown")
        page.fill("#message", "and you?")
        page.keyboard.press("Enter")
        answer = page.locator("article.assistant").nth(1)
        expect(answer).to_have_attribute("data-state", "done")
        page.screenshot(path=str(ARTIFACTS / f"web-models-{width}.png"))
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        return {
            "overflow": overflow,
            "options": options,
            "blocking": audit(page, "models"),
            "first": (first.locator(".meta").inner_text(), first.locator(".md").inner_text()),
            "second": (answer.locator(".meta").inner_text(), answer.locator(".md").inner_text()),
        }

    def single(page: Any) -> bool:
        page.wait_for_selector("#status:has-text('Connected')")
        page.wait_for_function("() => document.querySelector('#path option[value=http]')")
        return bool(page.locator("#model").is_hidden())

    settings = make_settings(
        provider="http",
        llm_base_url=fake_llm.base_url,
        llm_model="fake-model",
        models=[{"name": "second", "base_url": second.base_url, "model": "up-2"}],
    )
    with trio.fail_after(60):
        async with running_server(settings) as server:
            result, errors = await trio.to_thread.run_sync(
                lambda: drive_page(server.base_url, scenario, width=width)
            )
        async with running_server(http_settings(fake_llm)) as server:
            hidden, single_errors = await trio.to_thread.run_sync(
                drive_page, server.base_url, single
            )
    assert result["overflow"] == 0  # the composer fits, at 360 px too
    assert result["options"] == ["default (fake-model)", "second"]
    assert result["blocking"] == []
    assert result["first"] == ("via the http path · fake-model", "From the first model.")
    assert result["second"] == ("via the http path · second", "From the second model.")
    assert [s.request["model"] for s in second.streams] == ["up-2"]
    assert hidden  # one model: nothing to choose
    assert errors == []
    assert single_errors == []
