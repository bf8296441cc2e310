"""The viewer as a user meets it: `flashlens serve` in a subprocess, driven in real Chromium.

Needs /usr/bin/chromium and Playwright for Python (`playwright install` is not used: the
system browser is launched directly). Under CI=true a missing browser fails; elsewhere it skips.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flashlens.atlas import Atlas
from flashlens.serve.pages import display

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def _missing(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is missing: pip install playwright")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def server(stories_atlas: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`flashlens serve ATLAS --port 0` in a subprocess and its URL (read from its first line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashlens", "serve", str(stories_atlas), "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stderr = proc.stderr
    assert stderr is not None  # stderr=PIPE
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(stderr.readline()), daemon=True)
    reader.start()
    reader.join(timeout=120)
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+/", first[0] if first else "")
        assert match, f"no URL from `flashlens serve`: {first}"
        yield proc, match.group(0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_search_click_through_and_back(
    browser: Any, server: tuple[subprocess.Popen[str], str], stories_atlas: Path, tmp_path: Path
) -> None:
    proc, url = server
    atlas = Atlas.open(stories_atlas)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    shots: list[Path] = []

    def shot(name: str) -> None:
        shots.append(tmp_path / f"{name}.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

    # the overview, styled by the viewer's stylesheet
    assert page.goto(url).status == 200
    assert page.locator("h1").inner_text() == atlas.meta.model
    assert page.locator("header form input[name=q]").is_visible()
    shot("overview")

    # search from the header box; the hits are Atlas.search's, in its order
    page.locator("header input[name=q]").fill("dog")
    page.locator("header input[name=q]").press("Enter")
    page.wait_for_url(re.compile(r"/search\?q=dog"))
    expected = atlas.search("dog").hits
    links = page.locator("main table tbody tr td:first-child a")
    assert links.count() == len(expected)
    assert links.all_inner_texts() == [f"{h.matrix} {h.layer}:{h.index}" for h in expected]
    shot("search")

    # click through to the best neuron: its tokens, whitespace visible, in a monospace font
    best = expected[0]
    links.first.click()
    page.wait_for_url(re.compile(rf"/neuron/{best.matrix}/{best.layer}/{best.index}$"))
    assert page.locator("h1").inner_text() == f"Neuron {best.matrix} {best.layer}:{best.index}"
    rec = atlas.neuron(best.layer, best.index, best.matrix)
    cells = page.locator("main table").first.locator(".tok")
    assert cells.all_inner_texts() == [display(t.text, t.token) for t in rec.top]
    font = cells.first.evaluate("e => getComputedStyle(e).fontFamily")
    assert "mono" in font.lower()
    shot("neuron")

    # next neuron, then a token's reverse index
    page.get_by_text("next →").click()
    page.wait_for_url(re.compile(rf"/neuron/{best.matrix}/{best.layer}/{best.index + 1}$"))
    nxt = atlas.neuron(best.layer, best.index + 1, best.matrix)
    page.locator("main table").first.locator("a.tok").first.click()
    page.wait_for_url(re.compile(rf"/token/{nxt.top[0].token_id}$"))
    rows = page.locator("main table tbody tr")
    assert rows.count() == atlas.meta.reverse_n
    assert f"id {nxt.top[0].token_id}" in page.locator("h1").inner_text()
    shot("token")

    # a neuron address in the search box jumps to it; a bad one is a readable 404
    page.locator("header input[name=q]").fill("gate 3:10")
    page.locator("header input[name=q]").press("Enter")
    page.wait_for_url(re.compile(r"/neuron/gate/3/10$"))
    response = page.goto(url + "neuron/up/2/999")
    assert response.status == 404
    assert "neuron index 999 is out of range" in page.locator(".error").inner_text()
    shot("error")
    page.close()

    for path in shots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    # Ctrl-C stops the server cleanly
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None and "stopped" in proc.stderr.read()


def test_byte_tokens_read_in_italics_on_the_search_page(
    browser: Any, server: tuple[subprocess.Popen[str], str]
) -> None:
    """A byte token among a hit's top tokens shows its tokenizer form in italics, as on the
    neuron page, so it does not read as literal text."""
    _, url = server
    page = browser.new_page()
    assert page.goto(url + "search?q=ig&matrix=up&limit=200").status == 200
    byte = page.locator("main table .tokens .tok.byte")
    assert byte.count() > 0
    form = byte.first.inner_text()
    assert re.fullmatch(r"<0x[0-9A-F]{2}>", form)
    assert byte.first.evaluate("e => getComputedStyle(e).fontStyle") == "italic"
    assert "\ufffd" not in page.locator("main table").inner_text()
    byte.first.click()  # to the token's page: its heading reads the same, in italics too
    page.wait_for_url(re.compile(r"/token/\d+$"))
    heading = page.locator("h1 .tok")
    assert heading.inner_text() == form
    assert heading.evaluate("e => getComputedStyle(e).fontStyle") == "italic"
    page.close()


def test_pages_fit_a_narrow_screen_and_log_no_errors(
    browser: Any, server: tuple[subprocess.Popen[str], str]
) -> None:
    _, url = server
    page = browser.new_page(viewport={"width": 400, "height": 800})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    for path in ("", "neuron/up/2/7", "token/13", "search?q=the"):
        assert page.goto(url + path).status == 200
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"/{path} scrolls sideways on a 400 px screen ({width} px)"
        assert page.locator("header button").is_visible()
    assert errors == []  # no favicon 404 either


def test_sigterm_stops_the_server_cleanly(server: tuple[subprocess.Popen[str], str]) -> None:
    """A service manager stops the viewer with SIGTERM: a clean stop, as Ctrl-C is."""
    proc, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert proc.stderr is not None and "stopped" in proc.stderr.read()
