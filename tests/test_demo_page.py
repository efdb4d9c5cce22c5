"""The demo page in a real headless browser: Debian's chromium driven by Playwright (the system
executable; Playwright downloads no browser). Skips only where chromium is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots" / "demo_page.png"
# the flags this sandbox needs: no network beyond localhost, root user, no GPU
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium; "
                                                          ".ci/run installs it)")


@pytest.fixture(scope="module")
def page(base_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(base_url + "/")
        yield page
        browser.close()


def figure(page, name: str) -> str:
    return page.locator(f"#{name}").inner_text()


def generate(page, speculative: bool) -> None:
    page.fill("#prompt", "def read_config(path):")
    page.fill("#max-tokens", "48")
    page.fill("#temperature", "0")
    page.set_checked("#speculative", speculative)
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)


def test_streamed_text_and_figures_with_and_without_speculation(page, http):
    reference = http.post("/v1/completions", json={"prompt": "def read_config(path):", "max_tokens": 48}).json()
    generate(page, speculative=True)
    assert page.locator("#output").inner_text() == reference["choices"][0]["text"]
    assert int(figure(page, "tokens")) == reference["usage"]["completion_tokens"]
    steps = int(figure(page, "steps"))
    assert steps == reference["metrics"]["decode_steps"]
    assert float(figure(page, "per-step")) == pytest.approx(reference["metrics"]["accepted_tokens_per_step"], abs=0.01)
    assert float(figure(page, "rate")) > 0 and figure(page, "ttft").endswith("ms")
    assert page.locator("#output span.step").count() == steps + 1  # one band per step, and the prefill's token
    assert page.locator("#output span.step:not(.single)").count() >= 1  # a step accepted several tokens
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    generate(page, speculative=False)
    assert page.locator("#output").inner_text() == reference["choices"][0]["text"]
    assert figure(page, "per-step") == "1.00"
    assert page.locator("#output span.step:not(.single)").count() == 0


def test_errors_are_shown_and_the_page_keeps_working(page):
    page.fill("#max-tokens", "100000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('error')", timeout=30_000)
    assert "max_tokens" in page.locator("#status").inner_text()
    generate(page, speculative=True)
    assert page.locator("#output").inner_text()


def test_markup_in_the_model_output_is_shown_as_text(page):
    """The server's own stream, with the first chunk's text replaced by markup on its way to the page."""
    markup = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'

    def inject(route):
        response = route.fetch()
        lines, done = [], False
        for line in response.text().split("\n"):
            if line.startswith("data: {") and not done:
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    chunk["choices"][0]["text"], done = markup, True
                    line = "data: " + json.dumps(chunk)
            lines.append(line)
        route.fulfill(response=response, body="\n".join(lines))

    page.route("**/v1/completions", inject)
    try:
        generate(page, speculative=True)
    finally:
        page.unroute("**/v1/completions")
    assert page.locator("#output").inner_text().startswith(markup)
    assert page.locator("#output script, #output img, #output b").count() == 0
    assert page.evaluate("window.pwned") is None
