"""The web chat (/) and the dashboard (/dashboard), driven in a real headless Chromium (the
machine's own, Debian's package) by Playwright, against one `kvflow serve` of the demo
model with an API key. The run saves a screenshot of each page to docs/images."""
from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from playwright.sync_api import sync_playwright

from kvflow.bench.hardware import ceilings_path, measure_ceilings
from kvflow.cache import cache_root
from kvflow.demo import demo_model_path
from kvflow.engine.args import EngineArgs
from kvflow.server.api_server import create_app
from kvflow.server.args import ServerArgs
from server_process import ServerProcess

API_KEY = "web-ui-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
# A reply the demo model must write verbatim (a JSON string constrained to one value): the
# markup in it must show as text and never run.
REPLY_PAYLOAD = ('<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
                 " [link](javascript:window.__pwned=3)")
USER_PAYLOAD = '<img src=x onerror="window.__pwned = 4"><script>window.__pwned = 5</script>'
# Keeps the demo model writing: its end-of-text is masked until this many characters.
LONG_SCHEMA = json.dumps({"type": "string", "minLength": 4000})  # seconds: to be stopped
BUSY_SCHEMA = {"type": "string", "minLength": 2000}  # about two seconds, two at a time


def screenshot(page, name: str) -> None:  # noqa: ANN001
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / name))


def server_cache(root: Path) -> Path:
    """A KVFLOW_CACHE for the server: the kernels and kernel plans of this machine's cache,
    and `kvflow env`'s ceilings for one thread, measured here on a smaller read and matmul
    than kvflow env's (a second, not ten): the dashboard's roofline needs them."""
    real = cache_root()
    (root / "env").mkdir(parents=True)
    if (real / "kernels").is_dir():
        (root / "kernels").symlink_to(real / "kernels")
    for plan in (real / "env").glob("*"):
        (root / "env" / plan.name).symlink_to(plan)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = measure_ceilings("cpu", read_bytes=256 << 20, matmul_n=512, repeats=3)
        name = ceilings_path("cpu", threads=1).name
    finally:
        torch.set_num_threads(threads)
    target = root / "env" / name
    target.unlink(missing_ok=True)
    target.write_text(json.dumps(measured))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("web-ui")
    process = ServerProcess(None, "--api-key", API_KEY, "--enable-prompt-tokens-details",
                            "--num-threads", "1", log=folder / "serve.log",
                            env={"KVFLOW_CACHE": str(server_cache(folder / "cache"))})
    process.wait_ready()
    yield process
    assert process.stop(), process.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's package where "
                    "apt-get can run as root")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


class Page:
    """A page in a fresh browser context that holds the API key, with every console error
    and uncaught exception it meets."""

    def __init__(self, browser, server: ServerProcess, key: str | None = API_KEY,
                 viewport: tuple[int, int] = (1200, 800)) -> None:
        storage = {"cookies": [], "origins": [] if key is None else [
            {"origin": server.url, "localStorage": [{"name": "kvflow.apiKey", "value": key}]}]}
        self.context = browser.new_context(storage_state=storage, accept_downloads=True,
                                           viewport={"width": viewport[0],
                                                     "height": viewport[1]})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error"
                     and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.chat_bodies: list[dict] = []
        self.page.on("request", self._record)
        self.server = server

    def _record(self, request) -> None:  # noqa: ANN001
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.chat_bodies.append(json.loads(request.post_data))

    def open_chat(self) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("#model-info:has-text('kvflow-demo')")

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_answered(self, count: int = 1) -> None:
        self.page.wait_for_function(
            "n => document.querySelectorAll('.message.assistant .stats').length >= n "
            "&& document.getElementById('stop').hidden", arg=count)

    def settings(self, **fields: str) -> None:
        if self.page.locator("#settings").is_hidden():
            self.page.click("#settings-button")
        for name, value in fields.items():
            self.page.fill(f"#setting-{name}", value)
        self.page.click("#settings-close")

    def assistant_texts(self) -> list[str]:
        return self.page.locator(".message.assistant .content").all_inner_texts()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def chat(browser, server) -> Iterator[Page]:
    page = Page(browser, server)
    yield page
    page.close()
    assert page.errors == []


def stats(server: ServerProcess) -> dict:
    response = httpx.get(server.url + "/dashboard/stats", headers=HEADERS)
    response.raise_for_status()
    return response.json()


def test_pages_are_open_and_sent_with_a_strict_policy(server):
    for path in ("/", "/dashboard", "/ui/chat.js", "/ui/kvflow.css"):
        response = httpx.get(server.url + path)  # no key: a browser cannot send one here
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy, policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(server.url + "/ui/chat.js").headers["content-type"].startswith(
        "text/javascript")
    # What the pages call still needs the key.
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/dashboard/stats").status_code == 401
    assert httpx.get(server.url + "/ui/missing.js", headers=HEADERS).status_code == 404


def test_disable_web_ui_leaves_root_as_it_was():
    """No model is loaded: create_app's routes answer without one."""
    def client(disable: bool) -> TestClient:
        return TestClient(create_app(ServerArgs(engine=EngineArgs(model=str(demo_model_path())),
                                                disable_web_ui=disable)))

    off, on = client(True), client(False)
    unknown = off.get("/no-such-page")
    for path in ("/", "/dashboard", "/dashboard/stats", "/ui/chat.js"):
        response = off.get(path)
        assert (response.status_code, response.json()) == (404, unknown.json()), path
    assert on.get("/").status_code == 200
    assert on.get("/dashboard/stats").status_code == 503  # the model is not loaded here


def test_the_page_asks_for_the_key_and_keeps_it_in_the_browser(browser, server):
    page = Page(browser, server, key=None)
    try:
        page.page.goto(server.url + "/")
        page.page.fill("#key-input", "not-the-key")
        page.page.click("#key-dialog button")
        page.page.wait_for_selector("#key-dialog:has-text('refused')")
        page.page.fill("#key-input", API_KEY)
        page.page.click("#key-dialog button")
        page.page.wait_for_selector("#model-info:has-text('kvflow-demo')")
        assert page.page.evaluate("localStorage.getItem('kvflow.apiKey')") == API_KEY
        # Refused calls are the browser's console errors; nothing else is.
        assert page.errors and all("401" in error for error in page.errors), page.errors
        page.errors.clear()
        page.page.reload()
        page.page.wait_for_selector("#model-info:has-text('kvflow-demo')")
        assert page.page.locator("#key-dialog").count() == 0
        assert page.errors == []
    finally:
        page.close()


def test_a_reply_streams_with_its_figures_and_survives_a_reload(chat):
    chat.open_chat()
    assert "2,048-token context" in chat.page.inner_text("#model-info")
    chat.settings(system="You write Python.", max_tokens="48", seed="7", temperature="0.8")
    # The stop button shows while the reply streams. A short reply can come and go between
    # two polls of a selector on a busy machine, so an observer records that it showed.
    chat.page.evaluate("""() => {
      window.streamed = false;
      new MutationObserver(records => {
        if (records.some(r => r.attributeName === 'hidden' && r.oldValue !== null))
          window.streamed = true;
      }).observe(document.getElementById('stop'), {attributes: true, attributeOldValue: true});
    }""")
    chat.send("def fibonacci(n):")
    chat.wait_answered()
    assert chat.page.evaluate("window.streamed")
    body = chat.chat_bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "You write Python."},
                                {"role": "user", "content": "def fibonacci(n):"}]
    assert (body["max_tokens"], body["seed"], body["temperature"]) == (48, 7, 0.8)
    [answer] = chat.assistant_texts()
    assert answer.strip()
    figures = chat.page.inner_text(".message.assistant .stats")
    for part in ("tokens", "tok/s", "TTFT", "cached"):
        assert part in figures, figures
    screenshot(chat.page, "web-chat.png")
    chat.page.reload()
    chat.page.wait_for_selector(".message.assistant .stats")
    assert chat.assistant_texts() == [answer]
    assert chat.page.inner_text(".message.user .content") == "def fibonacci(n):"
    assert chat.page.input_value("#setting-max_tokens") == "48"


def test_stop_ends_the_stream_and_the_server_aborts_the_request(chat, server):
    before = stats(server)["requests"]["aborted_total"]
    chat.open_chat()
    chat.settings(max_tokens="1900", json_schema=LONG_SCHEMA)
    chat.send("Write a long string.")
    chat.page.wait_for_function(
        "() => (document.querySelector('.message.assistant .content')?.innerText || '')"
        ".length > 20")
    chat.page.click("#stop")
    chat.page.wait_for_selector(".message.assistant .note:has-text('Stopped')")
    assert chat.page.locator("#send").is_visible()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = stats(server)
        if now["requests"]["aborted_total"] == before + 1 and now["requests"]["running"] == 0:
            break
        time.sleep(0.1)
    assert (now["requests"]["aborted_total"], now["requests"]["running"]) == (before + 1, 0)
    assert now["kv_cache"]["usage"] == 0.0


def test_regenerate_and_edit_resend_the_conversation(chat):
    chat.open_chat()
    chat.settings(max_tokens="12")
    chat.send("import os")
    chat.wait_answered()
    chat.page.click(".message.assistant .regenerate")
    chat.wait_answered()
    assert len(chat.chat_bodies) == 2
    assert chat.chat_bodies[1]["messages"] == chat.chat_bodies[0]["messages"]
    assert len(chat.assistant_texts()) == 1  # the answer was replaced, not added to
    chat.send("import sys")
    chat.wait_answered(2)
    # Editing the first message drops everything after it and asks again.
    chat.page.locator(".message.user .edit").first.click()
    chat.page.fill(".editor textarea", "import json")
    chat.page.click(".editor button[type=submit]")
    chat.wait_answered()
    assert chat.chat_bodies[-1]["messages"] == [{"role": "user", "content": "import json"}]
    assert chat.page.locator(".message.user .content").all_inner_texts() == ["import json"]
    assert len(chat.assistant_texts()) == 1


def test_export_then_import_round_trips_the_conversations(chat, tmp_path):
    chat.open_chat()
    chat.settings(max_tokens="8", system="Be brief.")
    chat.send("class Stack:")
    chat.wait_answered()
    messages = chat.page.locator(".message .content").all_inner_texts()
    with chat.page.expect_download() as download:
        chat.page.click("#export-button")
    path = tmp_path / "export.json"
    download.value.save_as(path)
    exported = json.loads(path.read_text())
    assert exported["format"] == "kvflow-conversations"
    [conversation] = exported["conversations"]
    assert conversation["settings"]["system"] == "Be brief."
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    chat.page.click(".conversation-list .current .delete-conversation")
    assert chat.page.locator(".message").count() == 0
    chat.page.set_input_files("#import-input", str(path))
    chat.page.wait_for_selector("#status:has-text('Imported 1 conversation')")
    assert chat.page.locator(".message .content").all_inner_texts() == messages
    assert chat.page.input_value("#setting-system") == "Be brief."
    stored = chat.page.evaluate("JSON.parse(localStorage.getItem('kvflow.conversations'))")
    assert conversation in stored  # beside the empty one made when the last was deleted


def test_markup_from_the_user_and_the_model_is_shown_as_text(chat):
    chat.open_chat()
    schema = {"type": "string", "enum": [REPLY_PAYLOAD]}
    chat.settings(json_schema=json.dumps(schema), max_tokens="200")
    chat.send(USER_PAYLOAD)
    chat.wait_answered()
    assert chat.page.inner_text(".message.user .content") == USER_PAYLOAD
    [answer] = chat.assistant_texts()
    assert json.loads(answer) == REPLY_PAYLOAD  # the model wrote it, shown as written
    assert chat.page.locator("#messages script, #messages img").count() == 0
    assert chat.page.locator("#messages a").count() == 0  # a javascript: link stays text
    assert chat.page.evaluate("window.__pwned") is None


def test_reasoning_and_tool_calls_are_shown_apart_from_the_answer(chat):
    """The demo model has neither: the stream is the shape a server with a reasoning parser
    and a tool-call parser sends, replayed to the page."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "The user wants "}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "the weather."}}]},
              {"choices": [{"index": 0, "delta": {"content": "Let me **check**."}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1",
               "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
                  "arguments": "{\"city\": \"<b>Paris</b>\"}"}}]},
                  "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 20,
                                        "total_tokens": 29}}]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    chat.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    chat.open_chat()
    chat.send("Weather in Paris?")
    chat.wait_answered()
    reasoning = chat.page.locator(".message.assistant details.reasoning")
    assert reasoning.get_attribute("open") is None  # folded once the answer has come
    assert "The user wants" not in reasoning.inner_text()
    reasoning.locator("summary").click()
    assert "The user wants the weather." in reasoning.inner_text()
    content = chat.page.locator(".message.assistant .content")
    assert content.inner_text() == "Let me check."
    assert content.locator("strong").inner_text() == "check"
    call = chat.page.locator(".message.assistant .tool-call")
    assert "get_weather" in call.inner_text()
    assert '"city": "<b>Paris</b>"' in call.locator("pre").inner_text()
    assert "finish: tool_calls" in chat.page.inner_text(".message.assistant .stats")


def test_markdown_code_is_highlighted_and_copyable(chat):
    answer = "Here:\n\n```python\ndef f(x):\n    return x + 1  # one more\n```\n\n- a\n- b"
    chunk = {"choices": [{"index": 0, "delta": {"content": answer}, "finish_reason": "stop"}]}
    chat.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"))
    chat.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.open_chat()
    chat.send("code please")
    chat.wait_answered()
    block = chat.page.locator(".message.assistant .code-block")
    assert block.locator(".code-lang").inner_text() == "python"
    assert block.locator(".tok-kw").all_inner_texts() == ["def", "return"]
    assert block.locator(".tok-com").inner_text() == "# one more"
    assert chat.page.locator(".message.assistant li").all_inner_texts() == ["a", "b"]
    block.locator(".copy-code").click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == \
        "def f(x):\n    return x + 1  # one more"


def test_the_page_fits_a_phone_and_switches_themes(browser, server):
    page = Page(browser, server, viewport=(390, 844))
    try:
        page.open_chat()
        width = page.page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390
        assert page.page.locator("#prompt").is_visible()
        sidebar = "document.getElementById('sidebar').getBoundingClientRect()"
        assert page.page.evaluate(f"{sidebar}.right") <= 0  # the list is folded away
        page.page.click("#menu-button")
        page.page.wait_for_function(f"() => {sidebar}.left === 0")
        page.page.click("#menu-button")
        page.page.wait_for_function(f"() => {sidebar}.right <= 0")
        background = "getComputedStyle(document.body).backgroundColor"
        page.page.click("#theme-button")  # system -> light
        light = page.page.evaluate(background)
        page.page.click("#theme-button")  # light -> dark
        assert page.page.evaluate("document.documentElement.dataset.theme") == "dark"
        assert page.page.evaluate(background) != light
        assert page.errors == []
    finally:
        page.close()


def test_the_dashboard_moves_while_requests_run(browser, server):
    body = {"model": "kvflow-demo", "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 1500, "response_format": {"type": "json_schema", "json_schema": {
                "name": "long", "schema": BUSY_SCHEMA}}}

    def request() -> None:
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=HEADERS,
                   timeout=60)

    page = Page(browser, server)
    try:
        page.page.goto(server.url + "/dashboard")
        page.page.wait_for_selector("#live:has-text('live')")
        assert page.page.inner_text("#tile-running .value") == "0"
        runners = [threading.Thread(target=request) for _ in range(2)]
        for runner in runners:
            runner.start()
        page.page.wait_for_function(
            "() => document.querySelector('#tile-running .value').textContent === '2'")
        page.page.wait_for_function(
            "() => parseFloat(document.querySelector('#tile-tokens-out .value').textContent) > 0")
        page.page.wait_for_selector("#slowest td:has-text('generating')")
        step = page.page.inner_text("#tile-step .value")
        roofline = page.page.inner_text("#tile-roofline .value")
        kv = page.page.inner_text("#tile-kv .value")
        assert step.endswith(" ms") and float(step.split()[0]) > 0, step
        assert roofline.endswith("%") and float(roofline[:-1]) > 0, roofline
        assert kv.endswith("%") and float(kv[:-1]) > 0, kv
        assert "memory ceiling" in page.page.inner_text("#tile-roofline .note") or \
            "compute ceiling" in page.page.inner_text("#tile-roofline .note")
        page.page.wait_for_timeout(1500)  # a few polls, for the sparklines
        screenshot(page.page, "web-dashboard.png")
        for runner in runners:
            runner.join()
        page.page.wait_for_function(
            "() => document.querySelector('#tile-running .value').textContent === '0'")
        assert page.errors == []
    finally:
        page.close()
