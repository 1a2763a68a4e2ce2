"""The server's operational side over real HTTP on 127.0.0.1: API keys (401, a key file, refusing to serve beyond
loopback without one), limits (413 before the body is read, 408 for a slow body, max_tokens, per-key 429, a
stalled stream reader), /metrics, the JSON request log, draining, the dashboard with a key in a real browser,
and SIGTERM on a `persona-axis serve` subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serving import EXPERIMENT, tiny_axis_and_config, tiny_lm
from test_dashboard import browser_paths

from persona_axis.apps.server import PersonaServer, ServerLimits
from persona_axis.apps.server_access import ApiKeys, check_exposure
from persona_axis.apps.server_http import HttpOptions, build_app
from persona_axis.apps.server_run import BackgroundServer
from persona_axis.axis import save_axis
from persona_axis.control.capping import save_config
from persona_axis.errors import PersonaAxisError
from persona_axis.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-direct-0123456789abcdef"
FILE_KEYS = ["sk-first-from-file-aaaa", "sk-second-from-file-bbbb"]
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]
MAX_BODY = 64 * 1024
TOKEN_LIMIT = 6


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def serving(tokenizer: Any, limits: ServerLimits | None = None,
            options: HttpOptions | None = None) -> Iterator[tuple[str, PersonaServer, Any]]:
    """(base URL, PersonaServer, the ASGI app) for a server in a thread until the block ends."""
    lm = tiny_lm(tokenizer)
    axis, config = tiny_axis_and_config(lm)
    server = PersonaServer(lm, axis, config, limits or ServerLimits())
    app = build_app(server, options)
    with BackgroundServer(app) as background:
        yield background.url, server, app


@pytest.fixture(scope="module")
def tokenizer_module(embedded_dir: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def guarded(tokenizer_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PersonaServer, Path]]:
    """A server with one direct key and two from a key file, small limits, a log file and an alert threshold
    every reply falls below: (base URL, PersonaServer, log file)."""
    work = tmp_path_factory.mktemp("guarded")
    key_file = work / "keys.txt"
    key_file.write_text("# keys for the tests\n\n" + "\n".join(f"  {k}  " for k in FILE_KEYS) + "\n")
    log = work / "requests.jsonl"
    keys = ApiKeys.gather([KEY], key_file=key_file)
    limits = ServerLimits(max_body=MAX_BODY, max_tokens=TOKEN_LIMIT, per_key=1, read_timeout_s=1.0)
    with serving(tokenizer_module, limits, HttpOptions(keys, log, alert_below=1e9)) as (url, server, _app):
        yield url, server, log


def _ask(url: str, key: str | None, timeout: float = 60, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "persona-axis", "messages": HELLO, **body},
                      headers=bearer(key) if key else {}, timeout=timeout)


def _log_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _wait(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": "Bearer"}, bearer(KEY + "x")])
def test_a_missing_or_wrong_key_gets_a_one_line_401(guarded: tuple[str, Any, Path], headers: dict[str, str]) -> None:
    url, _, _ = guarded
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/persona_axis"),
                         ("GET", "/metrics")):
        response = httpx.request(method, url + path, headers=headers, timeout=30,
                                 json={"messages": HELLO} if method == "POST" else None)
        error = response.json()["error"]
        assert response.status_code == 401, path
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert "\n" not in error["message"] and response.headers["WWW-Authenticate"] == "Bearer"


def test_every_key_of_the_file_and_the_direct_one_work_and_the_page_stays_open(guarded: tuple[str, Any, Path]) -> None:
    url, _, _ = guarded
    for key in [KEY, *FILE_KEYS]:
        assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
        reply = _ask(url, key, max_tokens=2)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 2
    assert httpx.get(url + "/health").status_code == 200
    assert "<svg id=\"token-chart\"" in httpx.get(url + "/").text
    assert httpx.get(url + "/static/dashboard.js").status_code == 200


def test_key_sources_and_their_errors(tmp_path: Path) -> None:
    keys = ApiKeys.gather(["a-key"], env_key="env-key")
    assert keys.identify("Bearer a-key") == key_id("a-key") and keys.identify("bearer env-key") == key_id("env-key")
    assert keys.identify("Bearer other") is None and keys.identify(None) is None and not ApiKeys()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(PersonaAxisError, match="has no keys"):
        ApiKeys.gather(key_file=empty)
    with pytest.raises(PersonaAxisError, match="cannot read the API key file"):
        ApiKeys.gather(key_file=tmp_path / "missing.txt")
    with pytest.raises(PersonaAxisError, match="without spaces"):
        ApiKeys(["two words"])


def test_only_loopback_may_be_served_without_a_key() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_exposure(host, ApiKeys())
    for host in ("0.0.0.0", "", "::", "192.0.2.10"):
        with pytest.raises(PersonaAxisError, match="refusing to listen"):
            check_exposure(host, ApiKeys())
        check_exposure(host, ApiKeys(["k"]))
        check_exposure(host, ApiKeys(), allow_unauthenticated=True)


def test_the_command_refuses_0000_without_a_key_before_loading_or_binding(tmp_path: Path) -> None:
    """Nothing here exists (model, axis): the refusal comes first, in one line, with a nonzero exit."""
    env = {k: v for k, v in os.environ.items() if k != "PERSONA_AXIS_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "persona_axis.cli", "serve", "--model", str(tmp_path / "no-model"),
         "--axis", str(tmp_path / "no-axis.safetensors"), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "refusing to listen on 0.0.0.0 without an API key" in lines[0] and "--allow-unauthenticated" in lines[0]


# -- limits -------------------------------------------------------------------------------------------


def _raw_request(url: str, headers: list[str], key: str = KEY) -> socket.socket:
    """A socket that has sent a POST's request line and headers (with the key); the body is up to the test."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {key}",
            "Content-Type: application/json", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    return sock


def _status(sock: socket.socket) -> int:
    """The response's status code, read while the client has not finished its body."""
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        assert piece, "the server closed the connection without an answer"
        data += piece
    return int(data.split(b" ", 2)[1])


def test_an_oversized_body_gets_413_before_the_client_has_sent_it(guarded: tuple[str, Any, Path]) -> None:
    url, _, _ = guarded
    declared = 100 * 1024 * 1024  # 100 MiB announced by Content-Length; only 1 KiB of it is ever sent
    with _raw_request(url, [f"Content-Length: {declared}"]) as sock:
        sock.sendall(b"{" + b" " * 1023)
        assert _status(sock) == 413
    with _raw_request(url, ["Transfer-Encoding: chunked"]) as sock:  # no length: counted as it arrives
        piece = b" " * 16384
        for _ in range(MAX_BODY // len(piece) + 1):
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        assert _status(sock) == 413  # the terminating chunk was never sent
    small = _ask(url, KEY, max_tokens=1)
    assert small.status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_408_and_never_reaches_the_engine(
        guarded: tuple[str, Any, Path]) -> None:
    url, server, _ = guarded
    before = sum(server.engine.ended.values())
    with _raw_request(url, ["Content-Length: 100"]) as sock:
        sock.sendall(b'{"messages": ')
        assert _status(sock) == 408
    assert sum(server.engine.ended.values()) == before and server.engine.busy == 0


def test_max_tokens_is_cut_to_the_servers_limit(guarded: tuple[str, Any, Path]) -> None:
    url, _, _ = guarded
    for asked in ({"max_tokens": 400}, {"max_completion_tokens": 50}, {}):
        reply = _ask(url, KEY, temperature=0, persona_axis={"ignore_eos": True}, **asked).json()
        assert reply["usage"]["completion_tokens"] == TOKEN_LIMIT, asked
        assert reply["choices"][0]["finish_reason"] == "length"
    assert _ask(url, KEY, max_tokens=3, persona_axis={"ignore_eos": True}).json()["usage"]["completion_tokens"] == 3


def _gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers=bearer(KEY)).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_a_key_over_its_share_gets_429_with_retry_after_and_other_keys_do_not(guarded: tuple[str, Any, Path]) -> None:
    """The first key's request is held in flight by its unfinished body (the per-key count starts on arrival)."""
    url, _, _ = guarded
    body = json.dumps({"model": "m", "messages": HELLO, "max_tokens": 2}).encode()
    with _raw_request(url, [f"Content-Length: {len(body)}"], key=FILE_KEYS[0]) as sock:
        sock.sendall(body[:10])
        _wait(lambda: _gauge(url, "persona_axis_requests_in_flight") == 1)
        refused = _ask(url, FILE_KEYS[0], max_tokens=2)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert FILE_KEYS[0] not in refused.text and key_id(FILE_KEYS[0]) in refused.json()["error"]["message"]
        assert _ask(url, FILE_KEYS[1], max_tokens=2).status_code == 200  # another key is not limited by it
        sock.sendall(body[10:])
        assert _status(sock) == 200
    assert _ask(url, FILE_KEYS[0], max_tokens=2).status_code == 200  # its share is back


def test_a_stream_whose_client_reads_nothing_is_cancelled_and_its_connection_closed(tokenizer_module: Any,
                                                                                   tmp_path: Path) -> None:
    """Small socket buffers on both sides, and a client that never reads: the server's sends stall, and after
    write_timeout_s the reply is given up (logged as stalled), its row freed and the connection closed."""
    log = tmp_path / "log.jsonl"
    lm = tiny_lm(tokenizer_module)
    axis, config = tiny_axis_and_config(lm)
    server = PersonaServer(lm, axis, config, ServerLimits(write_timeout_s=0.5))
    background = BackgroundServer(build_app(server, HttpOptions(log=log)))
    background.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    with background:
        host, port = background.url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect((host, int(port)))
        body = json.dumps({"model": "m", "messages": HELLO, "max_tokens": 480, "stream": True,
                           "persona_axis": {"ignore_eos": True}}).encode()
        with sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait(lambda: log.exists() and any(line["finish"] == "stalled" for line in _log_lines(log)))
            _wait(lambda: server.engine.busy == 0)
            received = b""
            while piece := sock.recv(65536):  # what was buffered, then the end: the server closed it
                received += piece
        assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received


# -- metrics and the request log ----------------------------------------------------------------------


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url + "/metrics", headers=bearer(KEY))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_parse_and_move_with_requests(guarded: tuple[str, Any, Path]) -> None:
    url, _, _ = guarded
    before = _samples(url)
    reply = _ask(url, KEY, max_tokens=4, temperature=0, persona_axis={"cap": EXPERIMENT, "ignore_eos": True})
    assert reply.status_code == 200
    refused = _ask(url, "sk-wrong", max_tokens=4)
    assert refused.status_code == 401
    after = _samples(url)

    def moved(name: str, **labels: str) -> float:
        sample = (name, tuple(sorted(labels.items())))
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert moved("persona_axis_requests_total", route="/v1/chat/completions", status="200") == 1
    assert moved("persona_axis_requests_total", route="/v1/chat/completions", status="401") == 1
    assert moved("persona_axis_replies_total", finish="length") == 1
    assert moved("persona_axis_completion_tokens_total") == 4
    assert moved("persona_axis_prompt_tokens_total") == reply.json()["usage"]["prompt_tokens"]
    assert moved("persona_axis_time_to_first_token_seconds_count") == 1
    assert moved("persona_axis_time_per_output_token_seconds_count") == 3  # the gaps between 4 tokens
    assert moved("persona_axis_cap_engaged_share_count", experiment=EXPERIMENT) == 1
    engaged = reply.json()["persona_axis"]["cap_engaged"]
    assert moved("persona_axis_cap_engaged_share_sum", experiment=EXPERIMENT) == pytest.approx(
        sum(engaged.values()) / len(engaged))
    assert moved("persona_axis_drift_alerts_total", experiment=EXPERIMENT) == 1  # every reply is below 1e9
    assert after[("persona_axis_queue_length", ())] == 0 and after[("persona_axis_running_rows", ())] == 0
    assert after[("persona_axis_requests_in_flight", ())] == 0


def test_each_server_has_its_own_metrics(tokenizer_module: Any, guarded: tuple[str, Any, Path]) -> None:
    with serving(tokenizer_module) as (other, _, _):
        assert httpx.get(other + "/metrics").status_code == 200  # no keys: open
        _ask(other, None, max_tokens=1)
        mine = httpx.get(other + "/metrics").text
        served = [s for f in text_string_to_metric_families(mine) for s in f.samples
                  if s.name == "persona_axis_requests_total" and s.labels["route"] == "/v1/chat/completions"]
        assert [(s.labels["status"], s.value) for s in served] == [("200", 1.0)]


def test_one_json_log_line_per_request_names_the_key_by_id_only(guarded: tuple[str, Any, Path]) -> None:
    url, _, log = guarded
    reply = _ask(url, FILE_KEYS[1], max_tokens=5, persona_axis={"cap": EXPERIMENT, "ignore_eos": True}).json()
    refused_before = [entry for entry in _log_lines(log) if entry["status"] == 401]
    _ask(url, "sk-not-a-key-at-all", max_tokens=5)
    # Lines are written as requests end, and the module's server also logs other tests' requests: find ours by
    # content rather than by position.
    _wait(lambda: len([e for e in _log_lines(log) if e["status"] == 401]) > len(refused_before)
          and any(e.get("id") == reply["id"] for e in _log_lines(log)))
    lines = _log_lines(log)
    refused = [entry for entry in lines if entry["status"] == 401][len(refused_before):]
    line = next(entry for entry in lines if entry["id"] == reply["id"])
    assert line["key"] == key_id(FILE_KEYS[1]) and line["status"] == 200 and line["finish"] == "length"
    assert line["prompt_tokens"] == reply["usage"]["prompt_tokens"] and line["completion_tokens"] == 5
    assert line["cap"] == EXPERIMENT and line["alert"] is True and line["path"] == "/v1/chat/completions"
    assert 0 < line["ttft_s"] <= line["duration_s"] and line["time"] > 1e9
    assert [entry["key"] for entry in refused] == ["-"] and refused[0]["path"] == "/v1/chat/completions"
    text = log.read_text()
    assert all(secret not in text for secret in [KEY, *FILE_KEYS, "sk-not-a-key-at-all"])


def test_a_draining_server_refuses_new_requests_with_503(tokenizer_module: Any) -> None:
    with serving(tokenizer_module) as (url, _, app):
        assert _ask(url, None, max_tokens=1).status_code == 200
        app.loop.call_soon_threadsafe(app.drain, 60.0)
        _wait(lambda: app.draining)
        refused = _ask(url, None, max_tokens=1)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]


# -- the dashboard with a key, in a real browser -------------------------------------------------------


@pytest.fixture()
def browser() -> Iterator[Any]:
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


def _body(browser: Any, attribute: str) -> Any:
    return browser.find_element(By.TAG_NAME, "body").get_attribute(attribute)


def test_the_page_asks_for_the_key_or_takes_it_from_the_fragment(browser: Any, tokenizer_module: Any) -> None:
    with serving(tokenizer_module, options=HttpOptions(ApiKeys([KEY]))) as (url, _, _):
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: _body(d, "data-needs-key") == "1")
        assert browser.find_element(By.ID, "key-form").is_displayed() and not _body(browser, "data-ready")
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "key-submit").click()
        WebDriverWait(browser, 30).until(lambda d: _body(d, "data-ready") == "1")
        assert not browser.find_element(By.ID, "key-form").is_displayed()
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("4")
        browser.find_element(By.ID, "input").send_keys("Hi")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: _body(d, "data-replies") == "1")
        assert "error" not in browser.find_element(By.ID, "status").text

        browser.execute_script("sessionStorage.clear()")
        browser.get("about:blank")  # a fresh load of the page, with the key in its fragment
        browser.get(url + "/#key=" + KEY)
        WebDriverWait(browser, 30).until(lambda d: _body(d, "data-ready") == "1")
        assert browser.execute_script("return location.hash") == ""  # the key left the address bar


# -- SIGTERM on `persona-axis serve` ------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_files(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("serve-drain")
    axis, config = tiny_axis_and_config(load_model(tiny_model_dir, dtype="float32"))
    save_axis(axis, work / "axis.safetensors")
    save_config(config, work / "capping")
    return work / "axis.safetensors", work / "capping"


@pytest.mark.parametrize("drain_s, max_tokens, ending", [
    (30.0, 8, "data: [DONE]"),  # time enough: the reply in flight finishes
    (0.0, 480, "the server shut down before the reply was finished"),  # none: it is cancelled at once
])
def test_sigterm_drains_and_exits_0(serve_files: tuple[Path, Path], tiny_model_dir: str, drain_s: float, max_tokens: int,
                                    ending: str) -> None:
    axis, config = serve_files
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PERSONA_AXIS_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "persona_axis.cli", "serve", "--model", tiny_model_dir, "--dtype", "float32",
         "--axis", str(axis), "--config", str(config), "--port", "0", "--drain", str(drain_s)],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "serving" in line and "1 API key" in line, line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        body = {"model": "m", "messages": HELLO, "max_tokens": max_tokens, "stream": True,
                "persona_axis": {"ignore_eos": True}}
        with httpx.stream("POST", url + "/chat/completions", json=body, headers=bearer(KEY), timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if '"projection"' in line)  # a token has come: the reply is in flight
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert ending in rest[-1]
        assert process.wait(timeout=drain_s + 20) == 0
        assert time.monotonic() - signalled < drain_s + 20
        notes = process.stderr.read()  # the request's JSON line too: the command logs to stderr by default
        assert "SIGTERM: no new requests; 1 in flight" in notes and KEY not in notes
        logged = [json.loads(line) for line in notes.splitlines() if line.startswith("{")]
        assert [(entry["key"], entry["path"]) for entry in logged] == [(key_id(KEY), "/v1/chat/completions")]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
