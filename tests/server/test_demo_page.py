"""The demo chat page in a real headless browser, on the default chat model: Debian's chromium
driven by Playwright (the system executable; Playwright downloads no browser). Skips only where
chromium is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots" / "demo_page.png"
# the flags this sandbox needs: no network beyond localhost, root user, no GPU
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium; "
                                                          ".ci/run installs it)")


@pytest.fixture(scope="module")
def page(chat_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(chat_url + "/")
        yield page
        browser.close()


def figure(page, name: str) -> str:
    return page.locator(f"#{name}").inner_text()


def wait_done(page) -> None:
    page.wait_for_function("['done', 'stopped'].includes(document.getElementById('status').textContent) || "
                           "document.getElementById('status').textContent.startsWith('error')", timeout=120_000)


def send(page, text: str, speculative: bool = True, max_tokens: int = 48) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.set_checked("#speculative", speculative)
    page.fill("#message", text)
    page.click("#send")
    wait_done(page)


def answers(page) -> list[str]:
    return page.locator("#conversation .turn.assistant").all_inner_texts()


def reference(chat_http, messages: list[dict]) -> dict:
    return chat_http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 48}).json()


def test_a_two_turn_conversation_sends_both_turns(page, chat_http):
    page.click("#clear")
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    first = [{"role": "user", "content": "What is the capital of France?"}]
    send(page, first[0]["content"])
    one = reference(chat_http, first)
    assert answers(page) == [one["choices"][0]["message"]["content"]]
    assert int(figure(page, "tokens")) == one["usage"]["completion_tokens"]
    steps = int(figure(page, "steps"))
    assert steps == one["metrics"]["decode_steps"]
    assert float(figure(page, "per-step")) == pytest.approx(one["metrics"]["accepted_tokens_per_step"], abs=0.01)
    bands = page.locator("#conversation .turn.assistant span.step").count()  # a band a step, and the prefill's
    assert steps <= bands <= steps + 1  # (a last step may have decoded only the end of the turn)
    assert page.locator("#conversation .turn.assistant span.step:not(.single)").count() >= 1  # several at once

    second = [*first, {"role": "assistant", "content": answers(page)[0]},
              {"role": "user", "content": "And what is the capital of Italy?"}]
    send(page, second[-1]["content"])
    assert bodies[-1]["messages"] == second  # the second answer is conditioned on the first
    assert answers(page)[1] == reference(chat_http, second)["choices"][0]["message"]["content"]
    assert page.locator("#conversation .turn.user").all_inner_texts() == [first[0]["content"], second[-1]["content"]]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.set_checked("#speculative", False)
    page.click("#regenerate")  # the last answer again, by standard decoding: the same greedy text
    wait_done(page)
    assert len(answers(page)) == 2 and answers(page)[1] == reference(chat_http, second)["choices"][0]["message"]["content"]
    assert figure(page, "per-step") == "1.00"
    assert bodies[-1]["messages"] == second


def test_stop_keeps_the_partial_answer(page):
    page.click("#clear")
    page.fill("#max-tokens", "256")
    page.fill("#message", "Write a long story about a dragon.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('#conversation .turn.assistant span').length > 3",
                           timeout=60_000)
    page.click("#stop")
    wait_done(page)
    assert figure(page, "status") == "stopped" and answers(page)[0]


def test_errors_are_shown_and_the_page_keeps_working(page):
    page.click("#clear")
    send(page, "Hello!", max_tokens=100000)
    assert figure(page, "status").startswith("error") and "max_tokens" in figure(page, "status")
    assert answers(page) == []  # an answer that never came leaves no turn
    send(page, "Hello!")
    assert figure(page, "status") == "done" and answers(page)[0]


def test_markup_in_the_model_output_is_shown_as_text(page):
    """The server's own stream, with the first chunk's text replaced by markup on its way to the page."""
    markup = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'

    def inject(route):
        response = route.fetch()
        lines, done = [], False
        for line in response.text().split("\n"):
            if line.startswith("data: {") and not done:
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    chunk["choices"][0]["delta"]["content"], done = markup, True
                    line = "data: " + json.dumps(chunk)
            lines.append(line)
        route.fulfill(response=response, body="\n".join(lines))

    page.click("#clear")
    page.route("**/v1/chat/completions", inject)
    try:
        send(page, "Say hello.")
    finally:
        page.unroute("**/v1/chat/completions")
    assert answers(page)[0].startswith(markup)
    assert page.locator("#conversation script, #conversation img, #conversation b").count() == 0
    assert page.evaluate("window.pwned") is None
