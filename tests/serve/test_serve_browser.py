"""End to end: `vitp serve` as a real uvicorn process on loopback, driven by headless Chromium.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` package; playwright only drives
that browser (it never downloads one). Every request the page makes is checked to stay on the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("VITP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
START_TIMEOUT_S = 90
WAIT_MS = 30_000


class ServerProcess:
    """`vitp serve --port 0` in a child process; the URL is read from what it prints."""

    def __init__(self, index: Path, environment: dict[str, str]):
        command = [sys.executable, "-m", "vitp.cli", "serve", "--index", str(index), "--port", "0",
                   "--device", "cpu", "--faiss_device", "cpu", "--no_access_log"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=environment)
        self.lines: list[str] = []
        self.url: str | None = None
        self._started = threading.Event()
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._started.wait(START_TIMEOUT_S) or self.url is None:
            self.stop()
            raise AssertionError("vitp serve did not start:\n" + "".join(self.lines))

    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = re.match(r"open (http://\S+) ", line)
            if match:
                self.url = match.group(1)
                self._started.set()
        self._started.set()  # the process ended

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends: a graceful shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(served_gallery, loopback_environment):
    """One server for this module's tests (starting one takes seconds: torch, timm and the ViT load)."""
    running = ServerProcess(served_gallery.index, loopback_environment)
    yield running
    assert running.stop() == 0, "".join(running.lines)


@pytest.fixture
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_real_server_answers_and_survives_bad_requests(server, served_gallery):
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
        assert client.get("/api/health").json()["images"] == 25
        bad = client.post("/api/search", files={"image": ("notes.txt", b"not an image")})
        assert bad.status_code == 415 and "not an image" in bad.json()["detail"]
        assert client.get("/api/thumbnail", params={"path": "/etc/passwd"}).status_code == 404
        huge = client.post("/api/search", content=b"x" * (33 * 2**20), headers={"content-type": "multipart/form-data; boundary=b"})
        assert huge.status_code == 413

        query = served_gallery.queries[3].read_bytes()
        boundary = b"vitp-test"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + query + b"\r\n--" + boundary + b"--\r\n")

        def in_chunks():  # no Content-Length: the size limit is enforced while reading
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        chunked = client.post("/api/search", params={"k": 4}, content=in_chunks(),
                              headers={"content-type": f"multipart/form-data; boundary={boundary.decode()}"})
        assert chunked.status_code == 200 and len(chunked.json()["results"]) == 4
        plain = client.post("/api/search", params={"k": 4}, files={"image": ("q.png", query)}).json()
        assert plain["results"] == chunked.json()["results"]


def test_page_searches_by_upload_and_by_gallery_click(server, browser, served_gallery, tmp_path):
    requests, console_errors = [], []
    server_host = urlsplit(server.url).netloc
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))

    page.goto(server.url)
    expect(page.locator("body")).to_have_class(re.compile("ready"))
    expect(page.locator("#gallery li")).to_have_count(25)
    assert "25 images · 4 classes" in page.inner_text("#index-info")

    # Upload a query: K results with score, class and path; the query's class is unknown.
    query = served_gallery.queries[1]
    page.set_input_files("#file-input", str(query))
    expect(page.locator("#results li.result")).to_have_count(10)
    first = page.locator("#results li.result").first
    assert re.fullmatch(r"0\.\d{4}|1\.0000", first.locator(".score").inner_text())
    assert first.locator(".label").inner_text() in {"cross", "disk", "square", "stripes"}
    assert page.inner_text("#query-class") == "unknown (uploaded image)"
    assert page.locator("#results .badge").count() == 0
    screenshot = tmp_path / "serve_upload.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    # Change K.
    page.fill("#k", "4")
    page.dispatch_event("#k", "change")
    expect(page.locator("#results li.result")).to_have_count(4)

    # Click a gallery image: it becomes the query, with its class, and every result says if it matches.
    page.locator("#gallery li button").nth(8).click()  # the 9th gallery image: a disk
    expect(page.locator("#query-class")).to_have_text("disk")
    expect(page.locator("#results .badge")).to_have_count(4)
    labels = page.locator("#results .label").all_inner_texts()
    badges = page.locator("#results .badge").all_inner_texts()
    assert badges == ["✓ same class" if label == "disk" else "✗ other class" for label in labels]
    assert re.search(rf"{labels.count('disk')} of 4 are disk", page.inner_text("#status"))

    # Filter by class.
    page.select_option("#class-filter", "stripes")
    expect(page.locator("#results .label")).to_have_text(["stripes"] * 4)
    assert page.locator("#results .badge").all_inner_texts() == ["✗ other class"] * 4

    # Click a result: it becomes the query.
    clicked_path = page.locator("#results li.result .path").first.get_attribute("title")
    page.locator("#results li.result button").first.click()
    expect(page.locator("#query-class")).to_have_text("stripes")
    expect(page.locator("body")).not_to_have_class(re.compile("busy"))
    assert page.inner_text("#query-name").startswith(clicked_path)

    assert not console_errors, json.dumps(console_errors, indent=2)

    # A bad upload shows the server's message and the page keeps working.
    bad = tmp_path / "notes.png"
    bad.write_text("not really a PNG")
    page.set_input_files("#file-input", str(bad))
    expect(page.locator("#error")).to_be_visible()
    assert "notes.png: not an image in a supported format" in page.inner_text("#error")
    page.set_input_files("#file-input", str(query))
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#results .label")).to_have_text(["stripes"] * 4)  # K and the class filter still apply

    page.screenshot(path=str(tmp_path / "serve_final.png"), full_page=True)
    keep = os.environ.get("VITP_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)

    elsewhere = [url for url in requests if urlsplit(url).scheme not in ("blob", "data") and urlsplit(url).netloc != server_host]
    assert not elsewhere, f"the page requested other hosts: {elsewhere}"
    # The only console error allowed is the browser's own note on the refused upload.
    assert all("status of 415" in error for error in console_errors), json.dumps(console_errors, indent=2)


def test_api_docs_render_without_the_internet(server, browser):
    """Swagger UI at /docs comes from a package, not a CDN: it renders on an air-gapped cluster."""
    requests = []
    server_host = urlsplit(server.url).netloc
    page = browser.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url.rstrip("/") + "/docs")
    expect(page.get_by_text("/api/search/gallery").first).to_be_visible()
    elsewhere = [url for url in requests if urlsplit(url).scheme not in ("blob", "data") and urlsplit(url).netloc != server_host]
    assert not elsewhere, f"/docs requested other hosts: {elsewhere}"
