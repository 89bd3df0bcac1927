"""The page at `/` in a real browser: headless Chromium (Debian's `chromium` package,
driven by Playwright without downloading a browser) chats with streaming and runs a
classification; a screenshot of each is kept in tests/server/artifacts/."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.serving import API_KEY, Server

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LLAMBA_CHROMIUM"), "/usr/bin/chromium", "chromium"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator[Any]:
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the page is untested")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="llamba-chromium-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 760},
        )
        try:
            tab = context.new_page()
            tab.goto(server.url + "/")
            yield tab
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_chat_streams_into_the_page(page: Any, server: Server) -> None:
    tab: Any = page
    ARTIFACTS.mkdir(exist_ok=True)
    tab.fill("#api-key", API_KEY)
    tab.dispatch_event("#api-key", "change")
    tab.wait_for_function("document.getElementById('model').textContent.includes('gemma')")
    assert tab.text_content("#status") == "ready"
    tab.fill("#temperature", "0")
    tab.fill("#max-tokens", "24")
    tab.fill("#chat-input", "Tell me about the sea.")
    tab.click("#chat-send")
    # Streamed: the reply is seen growing before it is complete.
    lengths: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = tab.evaluate(
            "(() => { const m = document.querySelector('.msg.assistant');"
            " return m ? m.firstChild ? m.firstChild.textContent : '' : ''; })()"
        )
        done = tab.query_selector(".msg.assistant .meta") is not None
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        if done:
            break
        time.sleep(0.01)
    assert tab.query_selector(".msg.assistant .meta") is not None
    assert len(lengths) >= 2, f"the reply did not stream in: {lengths}"
    meta = tab.text_content(".msg.assistant .meta")
    assert meta is not None and "tokens" in meta
    assert tab.query_selector(".msg.error") is None
    tab.screenshot(path=str(ARTIFACTS / "chat.png"))


def test_json_schema_box_constrains_the_reply(page: Any) -> None:
    tab: Any = page
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["calm", "stormy"]}},
        "required": ["mood"],
    }
    tab.fill("#schema", json.dumps(schema))
    tab.fill("#chat-input", "How is the sea today?")
    tab.click("#chat-send")
    tab.wait_for_function(
        "document.querySelectorAll('.msg.assistant .meta').length === 2", timeout=120_000
    )
    reply = tab.evaluate(
        "(() => { const m = document.querySelectorAll('.msg.assistant')[1];"
        " return m.firstChild.textContent; })()"
    )
    assert json.loads(reply)["mood"] in ("calm", "stormy")
    tab.screenshot(path=str(ARTIFACTS / "chat-json.png"))
    tab.fill("#schema", "")


def test_classify_tab_shows_a_bar_per_label(page: Any) -> None:
    tab: Any = page
    tab.click("nav button[data-tab=classify]")
    tab.fill("#classify-labels", "positive, negative, neutral")
    tab.click("#classify-run")
    tab.wait_for_selector("#classify-result .bar-row >> nth=2", timeout=60_000)
    rows = tab.query_selector_all("#classify-result .bar-row")
    labels = [r.get_attribute("data-label") for r in rows]
    assert labels == ["positive", "negative", "neutral"]
    values = [float(r.query_selector(".bar-value").text_content().rstrip("%")) for r in rows]
    assert sum(values) == pytest.approx(100, abs=0.2)
    best = tab.query_selector_all("#classify-result .bar-row.best")
    assert (
        len(best) == 1 and best[0].get_attribute("data-label") == labels[values.index(max(values))]
    )
    tab.screenshot(path=str(ARTIFACTS / "classify.png"))
