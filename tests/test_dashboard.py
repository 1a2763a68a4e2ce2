"""The dashboard in a real headless browser (Debian's chromium + chromium-driver under selenium): send a message,
wait for the streamed reply, one chart point per generated token, toggle the cap, compare, and the drift guard;
the charts' axes (numeric ticks that place the points, titles naming the layer), the threshold's calibrated
default, the alert's number (the running mean of the plotted reply) and the guard's marker are checked against
what the page plots and what the server reports. Takes a screenshot (into docs/dashboard.png, the README's,
when PERSONA_AXIS_SCREENSHOT=docs is set; else into the test's tmp_path).

The server is built here (not by serving.running_server) so that its capping config carries a calibrated
default-Assistant mean at layer 1, as `calibrate` records it, and a second experiment without one (whose
threshold falls back to its cap floor).

The browser is looked up on PATH (chromium or chromium-browser, and chromedriver) unless PERSONA_AXIS_CHROMIUM and
PERSONA_AXIS_CHROMEDRIVER name it, as scripts/install-browser.sh does. Without it the test is skipped with one line
saying what it needs, and fails instead in CI (CI=true)."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving import EXPERIMENT, tiny_axis_and_config, tiny_lm

from persona_axis.apps.server import PersonaServer, ServerLimits
from persona_axis.apps.server_http import build_app
from persona_axis.apps.server_run import BackgroundServer
from persona_axis.control.capping import CapLayer, Experiment

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
MESSAGE = "Tell me about yourself."
MAX_TOKENS = 20
READ_LAYER = 1  # EXPERIMENT caps layers 1 and 2: the page reads at the first
DEFAULT_MEAN = 0.75  # the calibrated default-Assistant mean at layer 1 (above the 0.5 floor, as calibration finds it)
FLOOR_ONLY = "layers_2:3-p0.25"  # an experiment whose cap has no recorded default mean
FLOOR_ONLY_FLOOR = 0.4
GUARD_MIN_TOKENS = 4  # the page's guard and alert read from the 4th token on (dashboard.js MIN_TOKENS)
ALERT = re.compile(r"running mean projection (-?\d+\.\d+) over (\d+) tokens")


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
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def calibrated_server(tokenizer: Any) -> Iterator[str]:
    """The tiny server of tests/serving.py, its layer-1 cap carrying a calibrated default mean, plus FLOOR_ONLY."""
    lm = tiny_lm(tokenizer)
    axis, config = tiny_axis_and_config(lm)
    for cap in config.experiments[EXPERIMENT].caps:
        cap.stats["default_mean"] = DEFAULT_MEAN
    config.experiments[FLOOR_ONLY] = Experiment(FLOOR_ONLY, [CapLayer(2, axis.unit(2), FLOOR_ONLY_FLOOR)])
    server = PersonaServer(lm, axis, config, ServerLimits())
    with BackgroundServer(build_app(server)) as background:
        yield background.url


def _text(element: Any) -> str:
    return str(element.get_attribute("textContent"))


def _plotted(browser: Any, series: str) -> list[tuple[float, bool]]:
    """The token chart's points of one series, in token order: (value, raised by the cap)."""
    points = browser.find_elements(By.CSS_SELECTOR, f"#token-chart circle.point.{series}")
    ordered = sorted(points, key=lambda p: int(p.get_attribute("data-token")))
    assert [int(p.get_attribute("data-token")) for p in ordered] == list(range(len(ordered)))
    return [(float(p.get_attribute("data-value")), "capped" in p.get_attribute("class").split()) for p in ordered]


def _check_y_axis(browser: Any, chart: str, values: list[float], heights: list[float]) -> None:
    """The chart's y ticks are round numbers (evenly spaced), bracket the values and place each value at its height."""
    labels = browser.find_elements(By.CSS_SELECTOR, f"#{chart}-chart .tick-label.y")
    ticks = [float(_text(t)) for t in labels]  # the printed numbers, as a reader reads them
    at = [float(t.get_attribute("data-y")) for t in labels]
    assert len(ticks) >= 3 and ticks == sorted(ticks)
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    assert ticks[0] <= min(values) and ticks[-1] >= max(values)
    for value, height in zip(values, heights, strict=True):  # the tick scale is the points' scale
        expected = at[0] + (value - ticks[0]) * (at[-1] - at[0]) / (ticks[-1] - ticks[0])
        assert abs(height - expected) < 0.6, (value, height, expected)


def _check_token_axes(browser: Any) -> None:
    points = browser.find_elements(By.CSS_SELECTOR, "#token-chart circle.point")
    _check_y_axis(browser, "token", [float(p.get_attribute("data-value")) for p in points],
                  [float(p.get_attribute("cy")) for p in points])
    title = _text(browser.find_element(By.ID, "token-y-title"))
    assert "projection on the Assistant Axis" in title and f"layer {READ_LAYER} " in title
    assert _text(browser.find_element(By.ID, "token-x-title")) == "reply token"
    x_ticks = [int(_text(t)) for t in browser.find_elements(By.CSS_SELECTOR, "#token-chart .tick-label.x")]
    assert x_ticks[0] == 1 and x_ticks == sorted(x_ticks) and x_ticks[-1] <= len(_plotted(browser, "primary"))


def _check_turn_chart(browser: Any, turns: int, threshold: float) -> None:
    points = browser.find_elements(By.CSS_SELECTOR, "#turn-chart circle.turn-point")
    assert [int(p.get_attribute("data-turn")) for p in points] == list(range(1, turns + 1))
    labels = [_text(t) for t in browser.find_elements(By.CSS_SELECTOR, "#turn-chart text.turn-label")]
    assert labels == [str(t) for t in range(1, turns + 1)]
    _check_y_axis(browser, "turn", [float(p.get_attribute("data-mean")) for p in points] + [threshold],
                  [float(p.get_attribute("cy")) for p in points]
                  + [float(browser.find_element(By.ID, "turn-threshold-line").get_attribute("y1"))])
    assert f"layer {READ_LAYER} " in _text(browser.find_element(By.ID, "turn-y-title"))
    assert _text(browser.find_element(By.ID, "turn-x-title")) == "turn"
    assert f"{threshold:g}" in _text(browser.find_element(By.ID, "turn-threshold-line-label"))


def _check_alert(browser: Any, turn: int, reply: str, threshold: float) -> float:
    """The alert names the turn, the reply, the layer and the threshold, and its number is the running mean of
    the plotted primary series (the whole reply, once it has ended); returns that mean."""
    values = [v for v, _ in _plotted(browser, "primary")]
    mean = sum(values) / len(values)
    assert mean < threshold  # the premise: this reply drifted below the threshold
    alert = browser.find_element(By.ID, "alert")
    assert alert.is_displayed()
    text = alert.text
    found = ALERT.search(text)
    assert found, text
    assert abs(float(found.group(1)) - mean) < 5e-4 and int(found.group(2)) == len(values)
    assert f"turn {turn}, {reply}, layer {READ_LAYER})" in text and f"threshold {threshold:g} " in text
    return mean


def _reply_tokens(url: str, capped: bool) -> int:
    """What the API itself generates for the page's request (greedy): the number of tokens."""
    body = {"model": "persona-axis", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "persona_axis": {"cap": EXPERIMENT if capped else None, "layer": READ_LAYER}}
    return int(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]["completion_tokens"])


def _reply_tokens_after(url: str, browser: Any) -> int:
    """Tokens of the second (uncapped) reply, asked of the API with the same two-turn history the page sent."""
    first = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .text")[0].get_attribute("textContent")
    body = {"model": "persona-axis", "max_tokens": MAX_TOKENS, "temperature": 0, "persona_axis": {"layer": READ_LAYER},
            "messages": [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": first},
                         {"role": "user", "content": MESSAGE}]}
    return int(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]["completion_tokens"])


def _send(browser: Any, text: str, replies: int) -> None:
    box = browser.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-replies")
                                     == str(replies))


def _threshold(browser: Any) -> tuple[float, str]:
    return (float(browser.find_element(By.ID, "threshold").get_attribute("value")),
            browser.find_element(By.ID, "threshold-source").text)


def test_the_page_charts_every_token_on_labelled_axes_alerts_and_marks_the_guard(browser: Any, tokenizer: Any,
                                                                                  tmp_path: Path) -> None:
    with calibrated_server(tokenizer) as url:
        caps = {e["id"]: e["caps"] for e in httpx.get(url + "/v1/persona_axis", timeout=30).json()["experiments"]}
        assert caps[EXPERIMENT][0] == {"layer": READ_LAYER, "floor": 0.5, "default_mean": DEFAULT_MEAN}
        assert caps[FLOOR_ONLY] == [{"layer": 2, "floor": FLOOR_ONLY_FLOOR, "default_mean": None}]
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))

        # The threshold's default is the calibration the server reports for the read layer, and says so.
        value, source = _threshold(browser)
        assert abs(value - caps[EXPERIMENT][0]["default_mean"]) < 0.005
        assert source == f"from the default-Assistant mean at layer {READ_LAYER}"
        Select(browser.find_element(By.ID, "experiment")).select_by_value(FLOOR_ONLY)
        value, source = _threshold(browser)
        assert abs(value - caps[FLOOR_ONLY][0]["floor"]) < 0.005 and source == "from the cap floor at layer 2"
        Select(browser.find_element(By.ID, "experiment")).select_by_value(EXPERIMENT)
        assert abs(_threshold(browser)[0] - DEFAULT_MEAN) < 0.005

        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys(str(MAX_TOKENS))
        _send(browser, MESSAGE, 1)  # turn 1: capped
        assert len(_plotted(browser, "primary")) == _reply_tokens(url, capped=True) > GUARD_MIN_TOKENS
        assert browser.find_elements(By.ID, "floor-line")  # the cap floor is drawn while capping
        _check_token_axes(browser)
        assert _text(browser.find_element(By.ID, "token-caption")).startswith(
            f"Turn 1, capped reply (blue), read at layer {READ_LAYER};")
        _check_alert(browser, 1, "capped reply", DEFAULT_MEAN)
        _check_turn_chart(browser, 1, DEFAULT_MEAN)

        browser.find_element(By.ID, "cap-toggle").click()  # turn 2: cap off
        _send(browser, MESSAGE, 2)
        assert len(_plotted(browser, "primary")) == _reply_tokens_after(url, browser)
        assert "uncapped" in browser.find_element(By.ID, "primary-label").text
        assert not browser.find_elements(By.ID, "floor-line")
        assert _text(browser.find_element(By.ID, "token-caption")).startswith("Turn 2, uncapped reply (blue)")
        _check_token_axes(browser)
        _check_alert(browser, 2, "uncapped reply", DEFAULT_MEAN)
        _check_turn_chart(browser, 2, DEFAULT_MEAN)
        assert not browser.find_elements(By.ID, "guard-line")

        # Turn 3: cap on, compare, and the guard with the user's own threshold above every projection so far; the
        # user's threshold survives a change of experiment (which would otherwise reset it to the calibration).
        seen = [float(p.get_attribute("data-value")) for p in browser.find_elements(By.CSS_SELECTOR, "#token-chart circle")]
        mine = math.ceil(10 * (max(seen) + 0.5)) / 10
        box = browser.find_element(By.ID, "threshold")
        box.clear()
        box.send_keys(f"{mine:g}")
        Select(browser.find_element(By.ID, "experiment")).select_by_value(FLOOR_ONLY)
        Select(browser.find_element(By.ID, "experiment")).select_by_value(EXPERIMENT)
        value, source = _threshold(browser)
        assert value == mine and source.startswith("your value")
        for toggle in ("cap-toggle", "compare-toggle", "guard-toggle"):
            browser.find_element(By.ID, toggle).click()
        _send(browser, "And what do you like?", 3)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".pair .turn.assistant")) == 2
        plain = [v for v, _ in _plotted(browser, "plain")]
        primary = _plotted(browser, "primary")
        assert plain and max(v for v, _ in primary) < mine  # the premise: the threshold is above every projection
        _check_token_axes(browser)
        mean = _check_alert(browser, 3, "capped reply (drift guard)", mine)
        assert abs(mean - sum(plain) / len(plain)) > 1e-3  # the alert reads the capped reply, not the uncapped one
        _check_turn_chart(browser, 3, mine)
        turn3 = browser.find_elements(By.CSS_SELECTOR, "#turn-chart circle.turn-point")[2]
        assert abs(float(turn3.get_attribute("data-mean")) - mean) < 1e-6

        # The running mean is below the threshold from the first token the guard reads: it fires on the 4th
        # (0-based 3); the cap then raises the tokens after it (those below the floor), never those up to it.
        fired = GUARD_MIN_TOKENS - 1
        assert browser.find_element(By.ID, "token-chart").get_attribute("data-guard-fired-at") == str(fired)
        line = browser.find_element(By.ID, "guard-line")
        assert line.get_attribute("data-token") == str(fired)
        dot = browser.find_element(By.CSS_SELECTOR, f"#token-chart circle.point.primary[data-token='{fired}']")
        assert abs(float(line.get_attribute("x1")) - float(dot.get_attribute("cx"))) < 1e-6
        assert _text(browser.find_element(By.ID, "guard-label")).startswith(f"guard fired (token {fired + 1})")
        assert not any(capped for _, capped in primary[: fired + 1])
        after = primary[fired + 1:]
        assert after and all(capped for value, capped in after if value < 0.5)
        screenshot = DOCS_SCREENSHOT if os.environ.get("PERSONA_AXIS_SCREENSHOT") == "docs" else tmp_path / "dashboard.png"
        browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
