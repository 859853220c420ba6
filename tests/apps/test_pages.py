"""The pages in headless Chromium (Playwright), against a real `surge serve`: chat with a
streamed answer, history after a reload, stop mid-answer, the writing cache, image labels, the
status page, phone width. A screenshot of each page is saved under results/screenshots/."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.apps._client import LONG_ANSWER, aborts, wait_engine_idle
from tests.server._helpers import ServerProcess

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
WAIT_MS = 30_000


@pytest.fixture
def page(browser: Any, apps_server: ServerProcess) -> Iterator[Any]:
    context = browser.new_context(base_url=apps_server.url, viewport={"width": 1280,
                                                                        "height": 860})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    yield page
    context.close()


def _open(page: Any, path: str) -> None:
    page.goto(path)
    page.wait_for_selector("body[data-ready='true']")


def test_chat_streams_an_answer_and_shows_it_again_after_reload(
        page: Any, screenshot_dir: Path) -> None:
    # The page asks for the deployment's limit (1024 here, for the stop test): 64 is plenty.
    page.route("**/messages", lambda route: route.continue_(post_data=json.dumps(
        {**json.loads(route.request.post_data), "max_tokens": 64})))
    _open(page, "/ui/chat.html")
    page.fill("#input", "Hello, I need help with my order")
    page.press("#input", "Enter")  # Enter submits
    page.wait_for_selector(".msg.user >> text=Hello, I need help with my order")
    answer = page.locator(".msg.assistant").first
    page.wait_for_selector(".msg.assistant:not(.streaming)")
    streamed = answer.locator(".text").inner_text()
    assert streamed.strip(), "no answer text arrived"
    assert page.locator("#error").is_hidden()
    assert re.fullmatch(r".*#[0-9a-f]{32}", page.url)
    page.screenshot(path=str(screenshot_dir / "chat.png"), full_page=True)

    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert page.locator(".msg.user .text").all_inner_texts() == [
        "Hello, I need help with my order"]
    assert page.locator(".msg.assistant .text").all_inner_texts() == [streamed]
    assert page.locator(".sessions li a.active").inner_text().startswith("Hello, I need help")


def test_shift_enter_adds_a_line_instead_of_sending(page: Any) -> None:
    _open(page, "/ui/chat.html")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line"
    assert page.locator(".msg").count() == 0


def test_stop_mid_answer_aborts_the_engine_and_keeps_the_partial_text(
        page: Any, apps_server: ServerProcess, screenshot_dir: Path) -> None:
    # The page sends temperature 0.7 and no seed; this test pins a seed whose answer is very
    # long, so it is surely still streaming when stop is pressed.
    def pin_seed(route: Any) -> None:
        body = {**json.loads(route.request.post_data), **LONG_ANSWER}
        route.continue_(post_data=json.dumps(body))

    page.route("**/messages", pin_seed)
    with httpx.Client(base_url=apps_server.url, timeout=30) as http:
        before = aborts(http.get("/metrics").text)
        _open(page, "/ui/chat.html")
        page.fill("#input", LONG_ANSWER["content"])
        page.click("#send")
        page.wait_for_function(
            "document.querySelector('.msg.assistant .text')?.textContent.length > 10")
        assert page.locator("#stop").is_visible()
        page.click("#stop")
        page.wait_for_selector(".msg.assistant .tag >> text=stopped")
        wait_engine_idle(http, before)
    partial = page.locator(".msg.assistant .text").inner_text()
    assert page.locator("#stop").is_hidden() and page.locator("#send").is_enabled()
    page.screenshot(path=str(screenshot_dir / "chat-stopped.png"), full_page=True)

    page.reload()
    page.wait_for_selector(".msg.assistant .tag >> text=stopped")
    stored = page.locator(".msg.assistant .text").inner_text()
    assert stored.startswith(partial[:10]) and len(stored) < 4000


def test_writing_assistant_shows_a_cache_hit(page: Any, screenshot_dir: Path) -> None:
    _open(page, "/ui/writing.html")
    page.select_option("#template", "summary")
    page.fill("#field-text", "Surge serves models to many users at once with batching.")
    page.select_option("#tone", "friendly")
    page.click("#generate")
    page.wait_for_selector("#result-badge >> text=generated")
    first = page.inner_text("#output")
    page.click("#generate")
    page.wait_for_selector("#cached-badge")
    assert page.inner_text("#output") == first
    assert page.locator("#generations li").count() == 2
    page.screenshot(path=str(screenshot_dir / "writing.png"), full_page=True)


def test_image_recognition_labels_each_dropped_image(page: Any, tmp_path: Path,
                                                      screenshot_dir: Path) -> None:
    files = []
    for name, colour in [("red.png", (220, 40, 40)), ("blue.png", (40, 60, 220))]:
        Image.new("RGB", (96, 96), colour).save(tmp_path / name)
        files.append(str(tmp_path / name))
    _open(page, "/ui/images.html")
    assert page.locator("#model option").all_inner_texts() == ["classifier"]
    page.set_input_files("#files", files)
    page.wait_for_function("document.querySelectorAll('.result .label-row').length === 10")
    for card in page.locator(".result").all():
        labels = card.locator(".label-row")
        assert labels.count() == 5
        percents = [float(t.rstrip("%")) for t in
                    card.locator(".label-row > span:nth-child(2)").all_inner_texts()]
        assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
        assert float(card.locator("[data-latency-ms]").get_attribute("data-latency-ms")) > 0
    page.screenshot(path=str(screenshot_dir / "images.png"), full_page=True)


def test_status_page_shows_live_numbers(page: Any, screenshot_dir: Path) -> None:
    # One request of its own, so the numbers do not depend on the tests run before.
    answered = page.request.post("/v1/completions", data={"model": "tiny", "prompt": "hi",
                                                           "max_tokens": 4}, timeout=60_000)
    assert answered.ok, answered.text()
    _open(page, "/ui/status.html")
    page.wait_for_function("Number(document.getElementById('total').textContent) >= 1")
    page.wait_for_function("document.getElementById('rps').textContent !== '–'")  # 2nd poll
    assert page.locator("#replicas tbody tr").count() == 1
    assert "ok" in page.inner_text("#replicas tbody")
    assert page.locator("#latency tbody tr").count() == 3
    # Where the time went: queue, prefill, decode, other and end to end (no stages here).
    assert page.locator("#breakdown tbody tr").count() == 5
    assert "Prefill" in page.inner_text("#breakdown tbody")
    page.screenshot(path=str(screenshot_dir / "status.png"), full_page=True)


def test_landing_and_chat_fit_a_phone(browser: Any, apps_server: ServerProcess,
                                      screenshot_dir: Path) -> None:
    context = browser.new_context(base_url=apps_server.url,
                                  viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        page.goto("/")
        page.screenshot(path=str(screenshot_dir / "home-phone.png"), full_page=True)
        _open(page, "/ui/chat.html")
        page.fill("#input", "Hi from my phone")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=WAIT_MS)
        for path in ("/ui/chat.html", "/ui/writing.html", "/ui/status.html",
                     "/ui/images.html", "/"):
            page.goto(path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{path} scrolls sideways at phone width ({width}px)"
        page.goto("/ui/chat.html")
        page.wait_for_selector("body[data-ready='true']")
        page.screenshot(path=str(screenshot_dir / "chat-phone.png"), full_page=True)
    finally:
        context.close()
