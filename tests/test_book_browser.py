"""Build the book at the smoke preset, serve it on 127.0.0.1, drive it in headless Chromium.

Checks that the client-side widget renders from the saved state, that choosing another entry
changes what is shown (with no kernel), and that no request fails or leaves the machine.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book built at the smoke preset into a temporary folder."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: run `make test` (it installs it)")
    out = tmp_path_factory.mktemp("book")
    env = {**os.environ, "SPADE_PRESET": "smoke"}
    jb = Path(sys.executable).parent / "jupyter-book"
    proc = subprocess.run([str(jb), "build", str(ROOT / "book"), "--path-output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (out / "build.log").write_text(proc.stdout + proc.stderr)
    html = out / "_build" / "html"
    assert (html / "index.html").exists()
    return html


def test_book_builds_without_sphinx_warnings(site: Path) -> None:
    """A warning is a broken cross-reference, a duplicate label or a missing file in the making
    (one existed: chapter B's label 'search' collided with the site's search page)."""
    log = (site.parent.parent / "build.log").read_text()
    # Sphinx's format ("file:line: WARNING: ...", or "WARNING: ..."); the kernels' own log lines
    # ("[IPKernelApp] WARNING | ...") are not about the book.
    warnings = [line for line in log.splitlines()
                if re.search(r"(^|: )(WARNING|ERROR|CRITICAL): ", line)]
    assert not warnings, "\n".join(warnings)


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _visible_images(page) -> list[bytes]:
    """Screenshots of the widget images now visible (blob URLs change on every render)."""
    images = page.locator(".jupyter-widgets img")
    return [images.nth(i).screenshot() for i in range(images.count())
            if images.nth(i).is_visible()]


def _open(page, url: str):
    """Load a page and wait until its widgets have rendered; returns its dropdowns."""
    page.goto(url, wait_until="networkidle")
    selects = page.locator(".jupyter-widgets select")
    selects.first.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('.jupyter-widgets img').length > 0")
    return selects


def _choose(page, select, index: int) -> list[bytes]:
    """Pick an option of a dropdown; the widget images visible afterwards."""
    select.select_option(index=index)
    page.wait_for_timeout(500)
    return _visible_images(page)


def test_widget_js_is_local_and_no_cdn_is_named(site: Path) -> None:
    page = (site / "hyperparameters.html").read_text()
    static = site / "_static"
    assert (static / "require.js").exists()
    assert (static / "@jupyter-widgets/html-manager/dist/embed-amd.js").exists()
    external = re.findall(r'<(?:script|link)[^>]*(?:src|href)="(https?://[^"]+)"', page)
    assert not external, f"the page loads resources from outside: {external}"
    assert "application/vnd.jupyter.widget-state+json" in page


@contextlib.contextmanager
def _page(failed: list[str]) -> Iterator:
    """A headless Chromium page that records failed, 4xx/5xx and off-machine requests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                  "--disable-component-update", "--no-first-run"],
        )
        page = browser.new_page()
        page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", None)
                and not r.url.startswith("data:") and failed.append(f"external {r.url}"))
        try:
            yield page
        finally:
            browser.close()


def test_every_chapter_is_built(site: Path) -> None:
    for name in ("saliency_methods", "additional_results", "hyperparameters", "ablation",
                 "gradient_noise", "computational_cost", "fastobc", "fidelity", "mask_agreement",
                 "full_evaluation"):
        page = (site / f"{name}.html").read_text()
        assert "Traceback" not in page, name
    assert "Table B.2" in (site / "additional_results.html").read_text()
    assert "Table A.1" in (site / "saliency_methods.html").read_text()
    assert "Figure E.5" in (site / "gradient_noise.html").read_text()
    assert "Table F.15" in (site / "computational_cost.html").read_text()
    assert "Table J.18" in (site / "fidelity.html").read_text()
    assert "Figure K.11" in (site / "mask_agreement.html").read_text()
    full = (site / "full_evaluation.html").read_text()
    assert "Table L.19" in full and "pass the filter" in full and "Verdict" in full
    fobc = (site / "fastobc.html").read_text()
    assert "Table I.16" in fobc and "Table I.17" in fobc and "mask group" in fobc
    ablation = (site / "ablation.html").read_text()
    assert all(f"Table D.1{k}" in ablation for k in (1, 2, 3, 4)) and "Figure D.4" in ablation


def test_map_browser_reacts_to_sample_and_method(server: str) -> None:
    failed: list[str] = []
    with _page(failed) as page:
        selects = _open(page, f"{server}/additional_results.html")
        assert selects.count() == 2
        sample, method = selects.nth(0), selects.nth(1)
        assert len(sample.locator("option").all_inner_texts()) >= 2
        assert len(method.locator("option").all_inner_texts()) >= 2
        start = _visible_images(page)
        assert len(start) == 1, "one page (image, mask, dense and SPADE maps) at a time"
        other_method = _choose(page, method, 1)
        assert len(other_method) == 1 and other_method != start, "the method changed nothing"
        other_sample = _choose(page, sample, 1)
        assert len(other_sample) == 1 and other_sample not in (start, other_method), \
            "the sample changed nothing"
        sample.select_option(index=0)
        assert _choose(page, method, 0) == start
    assert not failed, failed


def test_rule_browser_renders_and_reacts(server: str) -> None:
    failed: list[str] = []
    with _page(failed) as page:
        select = _open(page, f"{server}/hyperparameters.html").first
        before = _visible_images(page)
        options = select.locator("option").all_inner_texts()
        assert len(options) >= 2 and len(before) == 1
        after = _choose(page, select, 1)
        assert len(after) == 1 and after != before, "choosing another rule changed nothing"
        assert _choose(page, select, 0) == before
        page.goto(f"{server}/index.html", wait_until="networkidle")
    assert not failed, failed
