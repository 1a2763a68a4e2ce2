"""The dashboard in a real headless browser (Debian's chromium + chromium-driver under selenium): send a message,
wait for the streamed reply, one chart point per generated token, toggle the cap; takes a screenshot (into
docs/dashboard.png, the README's, when PERSONA_AXIS_SCREENSHOT=docs is set; else into the test's tmp_path).

The browser is looked up on PATH (chromium or chromium-browser, and chromedriver) unless PERSONA_AXIS_CHROMIUM and
PERSONA_AXIS_CHROMEDRIVER name it, as scripts/install-browser.sh does. Without it the test is skipped with one line
saying what it needs, and fails instead in CI (CI=true)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serving import EXPERIMENT, running_server

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
MESSAGE = "Tell me about yourself."


NEEDS_BROWSER = ("the dashboard test needs chromium + chromedriver (on PATH, or named by PERSONA_AXIS_CHROMIUM and"
                 " PERSONA_AXIS_CHROMEDRIVER): bash scripts/install-browser.sh installs them with apt-get")


def browser_paths() -> tuple[str, str]:
    """chromium's and chromedriver's paths; without them a skip saying what is needed, or in CI (CI=true) a failure."""
    chromium = os.environ.get("PERSONA_AXIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("PERSONA_AXIS_CHROMEDRIVER") or shutil.which("chromedriver")
    if chromium and driver and os.access(chromium, os.X_OK) and os.access(driver, os.X_OK):
        return chromium, driver
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(NEEDS_BROWSER + " (CI=true: a missing browser fails here)", pytrace=False)
    pytest.skip(NEEDS_BROWSER)


@pytest.fixture()
def browser() -> Any:
    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _reply_tokens(url: str, capped: bool) -> int:
    """What the API itself generates for the page's request (greedy): the number of tokens."""
    body = {"model": "persona-axis", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 24,
            "temperature": 0, "persona_axis": {"cap": EXPERIMENT if capped else None, "layer": 1}}
    return int(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]["completion_tokens"])


def _send(browser: Any, text: str, replies: int) -> None:
    box = browser.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-replies")
                                     == str(replies))


def test_the_page_charts_every_token_and_toggles_the_cap(browser: Any, tokenizer: Any, tmp_path: Path) -> None:
    with running_server(tokenizer) as (url, _server):
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("24")
        _send(browser, MESSAGE, 1)
        points = browser.find_elements(By.CSS_SELECTOR, "#token-chart circle.point.primary")
        assert len(points) == _reply_tokens(url, capped=True) > 0
        assert browser.find_elements(By.ID, "floor-line")  # the cap floor is drawn while capping
        assert len(browser.find_elements(By.CSS_SELECTOR, "#turn-chart circle.turn-point")) == 1

        browser.find_element(By.ID, "cap-toggle").click()  # cap off
        _send(browser, MESSAGE, 2)
        uncapped = browser.find_elements(By.CSS_SELECTOR, "#token-chart circle.point.primary")
        assert len(uncapped) == _reply_tokens_after(url, browser)
        assert "uncapped" in browser.find_element(By.ID, "primary-label").text
        assert not browser.find_elements(By.ID, "floor-line")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#turn-chart circle.turn-point")) == 2

        browser.find_element(By.ID, "cap-toggle").click()  # cap on again, and compare: both answers side by side
        browser.find_element(By.ID, "compare-toggle").click()
        _send(browser, "And what do you like?", 3)
        assert browser.find_elements(By.CSS_SELECTOR, "#token-chart circle.point.plain")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".pair .turn.assistant")) == 2
        screenshot = DOCS_SCREENSHOT if os.environ.get("PERSONA_AXIS_SCREENSHOT") == "docs" else tmp_path / "dashboard.png"
        browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def _reply_tokens_after(url: str, browser: Any) -> int:
    """Tokens of the second (uncapped) reply, asked of the API with the same two-turn history the page sent."""
    first = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .text")[0].get_attribute("textContent")
    body = {"model": "persona-axis", "max_tokens": 24, "temperature": 0, "persona_axis": {"layer": 1},
            "messages": [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": first},
                         {"role": "user", "content": MESSAGE}]}
    return int(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]["completion_tokens"])
