"""The human-study app in headless Chromium: a rater goes through the introduction, answers five
tasks, reloads and resumes at task 6; the export holds exactly those answers. No request fails or
leaves 127.0.0.1. Screenshots go to ``$SPADE_STUDY_SCREENSHOTS`` (the book's figures) or tmp."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from playwright.sync_api import expect
from study_folder import write_study_folder
from werkzeug.serving import make_server

from spade_lib import study

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RATER = "rater_07"
SHOT_WIDTH = 700
"""Viewport width of the screenshots, in CSS px: the book column (704 px) shows them unscaled."""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """The app on 127.0.0.1 (a free port) in a thread: (base URL, task folder, database)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: run `make test` (it installs it)")
    folder = write_study_folder(tmp_path / "tasks")
    db = tmp_path / "answers.sqlite"
    server = make_server("127.0.0.1", 0, study.create_app(folder, db), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", folder, db
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def _page(failed: list[str]) -> Iterator:
    """A headless Chromium page (as in test_book_browser) that records failed, 4xx/5xx and
    off-machine requests, console errors (a blocked script or style shows there) and page
    errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                  "--disable-component-update", "--no-first-run"],
        )
        # 700 px: the book's column is 704 px, so the screenshots are shown at their natural size
        # (tests/test_book_browser.py); full-page shots grow downwards.
        page = browser.new_page(viewport={"width": SHOT_WIDTH, "height": 600})
        page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", None)
                and not r.url.startswith("data:") and failed.append(f"external {r.url}"))
        page.on("console", lambda m: m.type == "error" and failed.append(f"console {m.text}"))
        page.on("pageerror", lambda e: failed.append(f"page error {e}"))
        try:
            yield page
        finally:
            browser.close()


def _shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("SPADE_STUDY_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _images_loaded(page) -> None:
    page.wait_for_load_state("load")  # every image has arrived
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 4 and all(w > 0 for w in widths), widths
    shown = page.eval_on_selector_all("img", "els => els.map(e => e.getBoundingClientRect().width)")
    assert all(w >= 224 for w in shown), f"images shown too small: {shown}"


def test_rater_flow_resume_and_export(served, tmp_path: Path) -> None:
    base, folder, db = served
    shots = _shots(tmp_path)
    tasks = pd.read_csv(folder / "tasks.csv").set_index("task_id")
    order = study.task_order(list(tasks.index), RATER)
    example = json.loads((folder / "example" / "example.json").read_text())
    failed: list[str] = []
    chosen: dict[str, str] = {}
    with _page(failed) as page:
        page.goto(f"{base}/")
        page.fill("#rater-input", RATER)
        page.click("#start")
        page.wait_for_url(f"**/r/{RATER}/instructions/1")
        _images_loaded(page)
        page.screenshot(path=str(shots / "instructions.png"), full_page=True)

        page.click("#next")
        page.wait_for_url("**/instructions/2")
        assert page.locator("#answer").count() == 0, "the answer shows before the pick"
        page.click(f"#pick-{example['answer']}")
        page.wait_for_selector("#answer")
        assert example["why"] in page.inner_text("#answer")
        assert page.locator("figure.match").count() == 1
        _images_loaded(page)
        page.screenshot(path=str(shots / "example_answer.png"), full_page=True)

        page.click("#next")
        page.wait_for_url("**/instructions/3")
        assert "Decline (neither / both match)" in page.inner_text("main")
        page.click("#begin")
        page.wait_for_url(f"**/r/{RATER}/task")

        for k in range(5):
            assert page.inner_text("#progress") == f"Task {k + 1} of 8"
            task_id = page.get_attribute("#task", "data-task-id")
            assert task_id == order[k]
            _images_loaded(page)
            if k == 0:
                page.screenshot(path=str(shots / "task.png"), full_page=True)
            side = tasks.loc[task_id, "correct_side"]
            choice = [side, "decline", "left", "right", side][k]
            page.click(f"button[data-choice={choice}]")
            expect(page.locator("#progress")).to_have_text(f"Task {k + 2} of 8")
            chosen[task_id] = choice

        page.reload()
        assert page.inner_text("#progress") == "Task 6 of 8"
        assert page.get_attribute("#task", "data-task-id") == order[5]
        # coming back from the start page with the same id resumes there too
        page.goto(f"{base}/")
        page.fill("#rater-input", RATER)
        page.click("#start")
        page.wait_for_selector("#resumed")
        assert page.inner_text("#progress") == "Task 6 of 8"
        assert page.get_attribute("#task", "data-task-id") == order[5]
        _images_loaded(page)
        page.screenshot(path=str(shots / "progress.png"), full_page=True)

        out = tmp_path / "answers.csv"
        study.main(["export", "--tasks", str(folder), "--db", str(db), "--out", str(out)])
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT task_id, choice, correct_side, seconds FROM answers "
                            "WHERE rater = ?", (RATER,)).fetchall()
        conn.close()
        assert len(rows) == 5
        assert {r[0]: r[1] for r in rows} == chosen
        assert all(r[2] == tasks.loc[r[0], "correct_side"] for r in rows)
        assert all(r[3] is not None and r[3] >= 0 for r in rows)
        csv = pd.read_csv(out)
        assert list(csv.columns) == list(study.EXPORT_COLUMNS) and len(csv) == 5
        assert dict(zip(csv["task_id"], csv["choice"], strict=True)) == chosen
        assert csv["correct"].tolist() == (csv["choice"] == csv["correct_side"]).tolist()
        assert csv["correct"].sum() == 2 + sum(
            chosen[order[k]] == tasks.loc[order[k], "correct_side"] for k in (2, 3))

        for k in range(5, 8):
            assert page.inner_text("#progress") == f"Task {k + 1} of 8"
            page.click("button[data-choice=decline]")
            expect(page.locator("#progress")).to_have_text(
                f"Task {k + 2} of 8" if k < 7 else "8 of 8 answered")
        page.wait_for_selector("#done")
        declined = 3 + sum(c == "decline" for c in chosen.values())
        assert f"all 8 tasks ({declined} declined)" in page.inner_text("main")
        page.screenshot(path=str(shots / "finish.png"), full_page=True)
    assert not failed, failed
    assert len(study.read_answers(db, folder)) == 8
