"""Build the whole book at a full-scale preset, serve it on 127.0.0.1, drive it in Chromium.

The preset (tests/book_build.py) is a tiny one of the ImageNet recipe on a synthetic image folder
(tests/synthetic_data.py), with its MobileNetV2- and ConvNeXt-style sibling presets beside it, as a
user with ImageNet builds the book at ``imagenet-resnet50`` (README, "Scaling to the real
datasets"): every chapter runs on the folder's data (models trained by ``spade_lib.train_full``,
samples from its validation split, many-image sources and Sparse FC from its training split, the
sparsity search on the evaluated model). The numbers mean nothing at this size; the build proves
that every chapter runs at full scale. nbval executes every chapter at ``smoke`` besides.

Checks that the client-side widget renders from the saved state, that choosing another entry
changes what is shown (with no kernel), that no request fails or leaves the machine, and that
every chapter's pictures and tables are readable at a common window size (screenshots of every
chapter go to the folder named by ``SPADE_BOOK_SCREENSHOTS``, else to a temporary one).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import book_build
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

VIEWPORT = {"width": 1300, "height": 900}
"""The window of the readability check: a common laptop screen. sphinx-book-theme gives a notebook
output 704 px there (957 px in a cell tagged ``full-width``)."""
MIN_SCALE = 0.9
"""No picture may be shown at less than this share of its natural width (see the test)."""
MIN_PANEL_PX = 120
"""No panel of a grid of images may be shown narrower than this, in CSS px (see the test)."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book built at the tiny full-scale preset into a temporary folder."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: run `make test` (it installs it)")
    root = tmp_path_factory.mktemp("full-scale")
    return book_build.build(str(book_build.full_scale_preset(root)), root / "book")


def test_book_builds_without_sphinx_warnings(site: Path) -> None:
    """A warning is a broken cross-reference, a duplicate label or a missing file in the making
    (one existed: chapter B's label 'search' collided with the site's search page)."""
    warnings = book_build.sphinx_warnings(site)
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


_DECODED = r"""() => [...document.querySelectorAll('.jupyter-widgets img')]
  .filter(img => { const box = img.getBoundingClientRect();
                   return box.width > 0 && box.height > 0
                          && getComputedStyle(img).visibility !== 'hidden'; })
  .map(img => { const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                c.getContext('2d').drawImage(img, 0, 0);
                return c.toDataURL(); })"""


def _visible_images(page, timeout_ms: int = 15_000) -> list[str]:
    """The widget images now visible, as their decoded pixels at natural size (PNG data URLs):
    blob URLs change on every render, and a screenshot changes with the layout (a page shown
    again after a wider one came back 1 px wider)."""
    page.wait_for_function(
        "[...document.querySelectorAll('.jupyter-widgets img')]"
        ".every(img => img.complete && img.naturalWidth > 0)", timeout=timeout_ms)
    return page.evaluate(_DECODED)


def _open(page, url: str):
    """Load a page and wait until its widgets have rendered; returns its dropdowns."""
    page.goto(url, wait_until="networkidle")
    selects = page.locator(".jupyter-widgets select")
    selects.first.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('.jupyter-widgets img').length > 0")
    return selects


def _choose(page, select, index: int) -> list[str]:
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
def _page(failed: list[str], viewport: dict[str, int] | None = None) -> Iterator:
    """A headless Chromium page (of ``viewport`` size, else Playwright's 1280x720) that records
    failed, 4xx/5xx and off-machine requests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                  "--disable-component-update", "--no-first-run"],
        )
        page = browser.new_page(viewport=viewport)
        page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", None)
                and not r.url.startswith("data:") and failed.append(f"external {r.url}"))
        try:
            yield page
        finally:
            browser.close()


def test_every_chapter_is_built_at_the_full_scale_preset(site: Path) -> None:
    pages = book_build.check_chapters(site)
    chapter_b = pages["additional_results"]
    # the siblings of the preset, found beside it, trained and shown (or said why not)
    assert "tiny-mobilenetv2" in chapter_b and "tiny-convnext" in chapter_b
    assert "tiny-mobilenetv2" in pages["computational_cost"]
    # the search ran on the evaluated model, without a held-out model
    assert "no held-out model" in chapter_b
    # the samples are the folder's: its classes named, the Trojan targets beyond them by number
    assert re.search(r"n[01] -> class \d", chapter_b), "the map browser names the folders"


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


def _chapters() -> list[str]:
    """Every page of ``book/_toc.yml`` (root, chapters, parts and sections, in order), so a
    chapter added to the table of contents is checked without touching this file."""
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    names: list[str] = []

    def walk(entry: dict) -> None:
        if "file" in entry:
            names.append(str(entry["file"]).removesuffix(".ipynb").removesuffix(".md"))
        for key in ("parts", "chapters", "sections"):
            for child in entry.get(key, []):
                walk(child)

    names.append(str(toc["root"]).removesuffix(".ipynb").removesuffix(".md"))
    walk({key: toc[key] for key in ("parts", "chapters", "sections") if key in toc})
    return names


# In the page: every visible picture of the article (figures and widget images) with its natural
# and shown width and its PNG bytes (base64; the widgets' images are blob: URLs), and every box
# that would scroll sideways around a table.
_MEASURE = r"""async () => {
  const article = document.querySelector("article.bd-article") || document.body;
  const pictures = [];
  for (const [i, img] of [...article.querySelectorAll("img")].entries()) {
    const box = img.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) continue;  // a hidden page of a browser
    let png = "";
    if (img.naturalWidth > 0) {
      const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
      let text = "";
      for (let k = 0; k < bytes.length; k += 8192)
        text += String.fromCharCode(...bytes.subarray(k, k + 8192));
      png = btoa(text);
    }
    pictures.push({index: i,
                   src: img.src.startsWith("blob:") ? "widget image"
                     : img.src.startsWith("data:") ? "inline image" : img.src.split("/").pop(),
                   natural: img.naturalWidth, shown: box.width, png});
  }
  const tables = [...article.querySelectorAll("*")]
    .filter(el => el.querySelector("table") && ["auto", "scroll"].includes(
      getComputedStyle(el).overflowX))
    .map(el => ({what: el.querySelector("table").innerText.replace(/\s+/g, " ").slice(0, 60),
                 scroll: el.scrollWidth, client: el.clientWidth}));
  return {pictures, tables};
}"""


def _panel_px(png: bytes) -> int | None:
    """The smallest image panel's width that ``spade_lib.widgets.png_bytes`` recorded, if any."""
    import io

    from PIL import Image

    from spade_lib.widgets import PANEL_PX_KEY

    if not png:
        return None
    value = Image.open(io.BytesIO(png)).text.get(PANEL_PX_KEY)
    return None if value is None else int(value)


def _settle(page) -> None:
    """Wait until every saved widget view has rendered (the html-manager puts a filled
    ``div.widget-subarea`` before the view's script) and every picture has loaded."""
    page.wait_for_function("""[...document.querySelectorAll(
        'script[type="application/vnd.jupyter.widget-view+json"]')].every(s => {
          const area = s.previousElementSibling;
          return area && area.classList.contains("widget-subarea") && area.childElementCount;
        })""", timeout=30_000)
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30_000)
    # the widget manager lays its images out after they load: wait until every image's width is
    # the same over two animation frames (no fixed delay, which a loaded machine can outlast)
    page.wait_for_function("""() => new Promise(done => {
        const widths = () => [...document.images].map(i => i.getBoundingClientRect().width);
        const first = widths().join();
        requestAnimationFrame(() => requestAnimationFrame(() => done(widths().join() === first)));
      })""", timeout=30_000)


def test_every_picture_and_table_is_readable_at_1300_px(server: str,
                                                       tmp_path: Path) -> None:
    """Open every page of the table of contents in a 1300x900 window, take a full-page
    screenshot, and check what the reader can see.

    Pictures. The book draws its figures at their reading size: 100 px per inch with labels of
    10 pt or more (``spade_lib.widgets``), and grids of maps with panels of about 150 px, no wider
    than the column (704 px; 957 px in a ``full-width`` cell). A page that shrinks a figure to fit
    shrinks all of it, labels included, so the rule is on the scale:

    * every visible picture of the article (figures, tables' images, the images of the widget
      browsers) is shown at no less than ``MIN_SCALE`` (90 %) of its natural width: a 10 pt label
      stays 9 pt or more, and a picture is not squeezed by the layout (a flex box, a table
      cell) either;
    * every grid of images (a PNG where ``png_bytes`` recorded its smallest panel's width) shows
      that panel at ``MIN_PANEL_PX`` (120) CSS px or more: scale x recorded width.

    Chapter A's old gallery broke both: eleven maps of 70 px in a 1236 px figure, shown at 704 px
    (57 %), so each map was 40 px wide.

    Tables. No box around a table scrolls sideways (``scrollWidth <= clientWidth + 1``): tables
    wrap at spaces in type a little smaller than the prose (``book/_css/spade-book.css``), and the
    widest sit in cells tagged ``full-width`` (and ``compact-tables``: 9.6 pt type).
    """
    shots = Path(os.environ.get("SPADE_BOOK_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    problems: list[str] = []
    sizes = ["page,picture,source,natural_px,shown_px,scale,panel_px,shown_panel_px"]
    chapters = _chapters()
    assert len(chapters) >= 11, chapters  # the intro and the ten chapters at least
    with _page(failed, VIEWPORT) as page:
        for name in chapters:
            page.goto(f"{server}/{name}.html", wait_until="networkidle")
            _settle(page)
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            seen = page.evaluate(_MEASURE)
            for pic in seen["pictures"]:
                where = f"{name}: picture {pic['index']} ({pic['src']})"
                if not pic["natural"]:
                    problems.append(f"{where} did not load")
                    continue
                scale = pic["shown"] / pic["natural"]
                panel = _panel_px(base64.b64decode(pic["png"]))
                shown_panel = None if panel is None else panel * scale
                sizes.append(f"{name},{pic['index']},{pic['src']},{pic['natural']},"
                             f"{pic['shown']:.0f},{scale:.3f},{panel or ''},"
                             f"{'' if shown_panel is None else f'{shown_panel:.0f}'}")
                if scale < MIN_SCALE:
                    problems.append(f"{where}: {pic['natural']} px wide, shown at "
                                    f"{pic['shown']:.0f} px ({100 * scale:.0f} % < "
                                    f"{100 * MIN_SCALE:.0f} %)")
                if shown_panel is not None and shown_panel < MIN_PANEL_PX:
                    problems.append(f"{where}: panels of {panel} px shown at "
                                    f"{shown_panel:.0f} px (< {MIN_PANEL_PX})")
            problems += [f"{name}: the table {t['what']!r}... scrolls sideways "
                         f"({t['scroll']} px of content in {t['client']} px)"
                         for t in seen["tables"] if t["scroll"] > t["client"] + 1]
    (shots / "sizes.csv").write_text("\n".join(sizes) + "\n")
    assert not failed, failed
    assert not problems, "\n".join(problems)
