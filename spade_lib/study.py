"""The human-study web app of Appendix H: raters match a neuron visualization to one of two crops.

The paper's study (Appendix H, Figures H.9 and H.10) shows each rater four images per task: the
full input image, the visualization of one output neuron, and two crops of the image. The rater
picks the crop that more closely resembles the visualization, or declines ("neither / both
match", both recorded as ``decline``). Raters are not told the classes, whether the neuron is the
correct or the predicted class, nor whether the visualization was made on the dense or the SPADE
model. A short instruction flow (what the four images mean; a worked example whose answer is shown
after the rater picks; how to decline) comes first.

This module serves that study on ``127.0.0.1`` with Flask and records the answers in SQLite:

- :func:`validate_task_folder` checks a task folder (layout below) and returns its tasks.
- :func:`create_app` builds the Flask app; :func:`task_order` is the order a rater sees the tasks
  in (random per rater, seeded from the rater id, so a returning rater resumes in the same order
  at the first unanswered task).
- :func:`read_answers` joins an answers database with its task folder (the table the book
  analyses); ``python -m spade_lib.study export`` writes it as CSV.
- ``python -m spade_lib.study serve`` runs the app (:func:`main`).

Task folder layout (written by ``spade_lib.study_tasks.build_tasks``)::

    tasks.csv          task_id, sample, neuron_kind, visualization, neuron, class_name,
                       correct_side
    images/{task_id}-full.png, -vis.png, -left.png, -right.png
    example/full.png, vis.png, left.png, right.png, example.json  {"answer", "why"}
    meta.json          a JSON object with at least "preset" and "n_tasks"

Answers live in the table ``answers(rater, task_id, choice, correct_side, seconds, answered_at)``
with one row per rater and task (the primary key), so an answer is final. ``seconds`` is measured
on the server: from the moment the task page was last served to that rater to the moment the
answer arrived (wall clock, clipped at 0); it is ``NULL`` (NaN in :func:`read_answers`) for an
answer posted without the page having been served. ``answered_at`` is the UTC time of the answer
in ISO 8601. The time each page was served is kept in a second table, ``shown``. The database runs
in WAL mode; every request opens its own connection and every write is one transaction.

JSON API (what the task pages call): ``POST /api/answer`` with ``{"rater", "task_id", "choice"}``
answers ``200 {"ok": true, "answered", "total", "next"}``; a malformed body, unknown key, bad
rater id or unknown choice is ``400``, an unknown task ``404``, a second answer by the same rater
to the same task ``409``; none of them changes the database. ``GET /api/progress?rater=ID``
answers ``{"rater", "answered", "total", "next_task"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flask import Flask, abort, g, jsonify, redirect, render_template, request, send_file, url_for
from jinja2 import DictLoader
from werkzeug.serving import make_server

from spade_lib.files import atomic_write
from spade_lib.study_pages import CSP, TEMPLATES

__all__ = ["CHOICES", "EXPORT_COLUMNS", "IMAGE_KINDS", "TASK_COLUMNS", "create_app", "main",
           "read_answers", "task_order", "valid_rater", "validate_task_folder"]

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TASK_COLUMNS = ("task_id", "sample", "neuron_kind", "visualization", "neuron", "class_name",
                "correct_side")
NEURON_KINDS = ("correct", "predicted")
VISUALIZATIONS = ("dense", "SPADE")
SIDES = ("left", "right")
CHOICES = ("left", "right", "decline")
IMAGE_KINDS = ("full", "vis", "left", "right")
EXPORT_COLUMNS = ("rater", "task_id", "sample", "neuron_kind", "visualization", "neuron", "choice",
                  "correct_side", "correct", "seconds", "answered_at")
RATER_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
TASK_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSWER_COLUMNS = ("rater", "task_id", "choice", "correct_side", "seconds", "answered_at")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers(
    rater TEXT NOT NULL,
    task_id TEXT NOT NULL,
    choice TEXT NOT NULL CHECK(choice in ('left','right','decline')),
    correct_side TEXT NOT NULL,
    seconds REAL,
    answered_at TEXT NOT NULL,
    PRIMARY KEY(rater, task_id));
CREATE TABLE IF NOT EXISTS shown(
    rater TEXT NOT NULL,
    task_id TEXT NOT NULL,
    shown_at REAL NOT NULL,
    PRIMARY KEY(rater, task_id));
"""


def _now() -> float:
    """Wall-clock time in seconds since the epoch (one place, so tests can set the clock)."""
    return time.time()


# --------------------------------------------------------------------------------------------
# The task folder


def _list_some(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_png(path: Path, missing: list[str], bad: list[str], root: Path) -> None:
    name = str(path.relative_to(root))
    if not path.is_file():
        missing.append(name)
        return
    with open(path, "rb") as fh:
        if fh.read(8) != PNG_SIGNATURE:
            bad.append(name)


def _int_column(frame: pd.DataFrame, column: str) -> pd.Series:
    values = []
    for task_id, raw in zip(frame["task_id"], frame[column], strict=True):
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"tasks.csv: column {column!r} of task {task_id!r} is {raw!r}; "
                             f"allowed: an integer >= 0") from None
        if value < 0:
            raise ValueError(f"tasks.csv: column {column!r} of task {task_id!r} is {value}; "
                             f"allowed: an integer >= 0")
        values.append(value)
    return pd.Series(values, index=frame.index, dtype="int64")


def validate_task_folder(path: str | os.PathLike) -> pd.DataFrame:
    """Check a study task folder and return its tasks.

    Parameters
    ----------
    path
        The folder (layout in the module docstring): ``tasks.csv``, ``images/``, ``example/`` and
        ``meta.json``.

    Returns
    -------
    pandas.DataFrame
        One row per task in file order, columns :data:`TASK_COLUMNS`; ``sample`` and ``neuron``
        are ``int64``, the rest strings.

    Raises
    ------
    ValueError
        Naming what is wrong: the folder or a file missing, ``tasks.csv`` with missing or unknown
        columns, no rows, a duplicate or malformed task id (allowed: 1-64 letters, digits, ``-``,
        ``_``), a value outside its allowed set (``neuron_kind`` in ``correct``/``predicted``,
        ``visualization`` in ``dense``/``SPADE``, ``correct_side`` in ``left``/``right``,
        ``sample``/``neuron`` integers >= 0, ``class_name`` not empty), an image that is missing
        or not a PNG, ``example.json`` without a valid ``answer``/``why``, or ``meta.json`` that
        is not an object with ``preset`` and ``n_tasks`` equal to the number of tasks.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"task folder {str(root)!r} does not exist or is not a folder")
    csv = root / "tasks.csv"
    if not csv.is_file():
        raise ValueError(f"task folder {str(root)!r} has no tasks.csv")
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{csv} cannot be read as CSV: {err}") from None
    missing_cols = [c for c in TASK_COLUMNS if c not in frame.columns]
    unknown_cols = [c for c in frame.columns if c not in TASK_COLUMNS]
    if missing_cols or unknown_cols:
        raise ValueError(f"tasks.csv has columns {list(frame.columns)}: missing {missing_cols}, "
                         f"unknown {unknown_cols}; allowed exactly {list(TASK_COLUMNS)}")
    if frame.empty:
        raise ValueError("tasks.csv has no tasks")
    frame = frame[list(TASK_COLUMNS)].copy()
    bad_ids = [t for t in frame["task_id"] if not TASK_ID_RE.fullmatch(t)]
    if bad_ids:
        raise ValueError(f"tasks.csv: task ids {_list_some([repr(t) for t in bad_ids])} are not "
                         f"allowed; use 1-64 letters, digits, '-' or '_'")
    dupes = sorted(frame["task_id"][frame["task_id"].duplicated()].unique())
    if dupes:
        raise ValueError(f"tasks.csv: task ids are not unique: {_list_some(dupes)} repeat")
    for column, allowed in (("neuron_kind", NEURON_KINDS), ("visualization", VISUALIZATIONS),
                            ("correct_side", SIDES)):
        bad = frame[~frame[column].isin(allowed)]
        if not bad.empty:
            first = bad.iloc[0]
            raise ValueError(f"tasks.csv: column {column!r} of task {first['task_id']!r} is "
                             f"{first[column]!r}; allowed: {list(allowed)}")
    empty = frame[frame["class_name"].str.strip() == ""]
    if not empty.empty:
        raise ValueError(f"tasks.csv: class_name of task {empty.iloc[0]['task_id']!r} is empty")
    frame["sample"] = _int_column(frame, "sample")
    frame["neuron"] = _int_column(frame, "neuron")

    missing: list[str] = []
    not_png: list[str] = []
    for task_id in frame["task_id"]:
        for kind in IMAGE_KINDS:
            _check_png(root / "images" / f"{task_id}-{kind}.png", missing, not_png, root)
    for kind in IMAGE_KINDS:
        _check_png(root / "example" / f"{kind}.png", missing, not_png, root)
    if missing:
        raise ValueError(f"task folder {str(root)!r} lacks {len(missing)} image(s): "
                         f"{_list_some(missing)}")
    if not_png:
        raise ValueError(f"task folder {str(root)!r}: {_list_some(not_png)} are not PNG files")

    example = _read_json(root / "example" / "example.json", root)
    if not isinstance(example, dict) or set(example) != {"answer", "why"}:
        raise ValueError(f"example/example.json must be an object with exactly the keys "
                         f"'answer' and 'why', got {example!r}")
    if example["answer"] not in SIDES:
        raise ValueError(f"example/example.json: answer is {example['answer']!r}; "
                         f"allowed: {list(SIDES)}")
    if not isinstance(example["why"], str) or not example["why"].strip():
        raise ValueError(f"example/example.json: why must be a sentence, got {example['why']!r}")

    meta = _read_json(root / "meta.json", root)
    if not isinstance(meta, dict) or not {"preset", "n_tasks"} <= set(meta):
        raise ValueError(f"meta.json must be an object with at least 'preset' and 'n_tasks', "
                         f"got {meta!r}")
    if isinstance(meta["n_tasks"], bool) or meta["n_tasks"] != len(frame):
        raise ValueError(f"meta.json: n_tasks is {meta['n_tasks']!r} but tasks.csv has "
                         f"{len(frame)} tasks")
    return frame.reset_index(drop=True)


def _read_json(path: Path, root: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"task folder {str(root)!r} lacks {path.relative_to(root)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path.relative_to(root)} is not valid JSON: {err}") from None


def _read_example(root: Path) -> dict[str, str]:
    return json.loads((root / "example" / "example.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Raters, order, database


def valid_rater(rater: Any) -> bool:
    """Whether ``rater`` is an allowed rater id: a string of 1-40 letters, digits, ``-``, ``_``."""
    return isinstance(rater, str) and RATER_RE.fullmatch(rater) is not None


def task_order(task_ids: Sequence[str], rater: str, seed: int = 0) -> list[str]:
    """The order in which ``rater`` sees the tasks: a random permutation seeded from the id.

    Parameters
    ----------
    task_ids
        The task ids (any order; they are sorted first, so the file order does not matter).
    rater
        The rater id (see :func:`valid_rater`).
    seed
        The app's seed; the permutation depends on it and on the rater id only (SHA-256 of both,
        so it is the same on every machine and Python run).

    Returns
    -------
    list of str
        The task ids, permuted.
    """
    if not valid_rater(rater):
        raise ValueError(f"rater id {rater!r} is not allowed; use 1-40 letters, digits, '-' "
                         f"or '_'")
    digest = hashlib.sha256(f"{int(seed)}\0{rater}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    ids = sorted(task_ids)
    return [ids[i] for i in rng.permutation(len(ids))]


def _connect(db_path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=10,
                               isolation_level=None)
    else:
        conn = sqlite3.connect(db_path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _init_db(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(db_path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(answers)"))
        if columns != ANSWER_COLUMNS:
            raise ValueError(f"database {str(db_path)!r} has a table 'answers' with columns "
                             f"{list(columns)}; expected {list(ANSWER_COLUMNS)}")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The app


def create_app(tasks_dir: str | os.PathLike, db_path: str | os.PathLike | None = None,
               seed: int = 0) -> Flask:
    """The study's Flask app for one task folder and one answers database.

    Parameters
    ----------
    tasks_dir
        A task folder; checked with :func:`validate_task_folder` before anything else.
    db_path
        The SQLite file for the answers (created with its tables if missing, put in WAL mode);
        ``None``: ``<tasks_dir>/answers.sqlite``.
    seed
        Combined with each rater id into that rater's task order (:func:`task_order`).

    Returns
    -------
    flask.Flask
        The app. Only requests whose ``Host`` is ``127.0.0.1`` or ``localhost`` are served (a
        guard against DNS rebinding); serve it on ``127.0.0.1`` (``python -m spade_lib.study
        serve`` does). Pages: ``/`` (rater id), ``/r/<rater>/instructions/<1-3>``,
        ``/r/<rater>/task``, ``/r/<rater>/done``; images ``/img/<task_id>/<kind>`` and
        ``/example/<kind>`` with ``kind`` in :data:`IMAGE_KINDS`; API in the module docstring.

    Raises
    ------
    ValueError
        If the task folder is invalid, ``seed`` is not an integer, or the database has an
        ``answers`` table with other columns.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    root = Path(tasks_dir).resolve()
    tasks = validate_task_folder(root)
    example = _read_example(root)
    db = Path(db_path) if db_path is not None else root / "answers.sqlite"
    _init_db(db)
    records = {row.task_id: row._asdict() for row in tasks.itertuples(index=False)}
    task_ids = list(records)
    total = len(task_ids)

    app = Flask(__name__, static_folder=None)
    app.jinja_loader = DictLoader(TEMPLATES)
    app.config.update(TRUSTED_HOSTS=[HOST, "localhost"], MAX_CONTENT_LENGTH=16 * 1024,
                      STUDY_TASKS_DIR=root, STUDY_DB=db.resolve(),
                      STUDY_SEED=int(seed))

    def conn() -> sqlite3.Connection:
        if "study_db" not in g:
            g.study_db = _connect(db)
        return g.study_db

    @app.teardown_appcontext
    def close_db(_exc: BaseException | None) -> None:
        db_conn = g.pop("study_db", None)
        if db_conn is not None:
            db_conn.close()

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if response.mimetype in ("text/html", "application/json"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def order(rater: str) -> list[str]:
        return task_order(task_ids, rater, int(seed))

    def answered(rater: str) -> dict[str, str]:
        rows = conn().execute("SELECT task_id, choice FROM answers WHERE rater = ?", (rater,))
        return {task_id: choice for task_id, choice in rows if task_id in records}

    def next_task(rater: str) -> tuple[str | None, int]:
        done = answered(rater)
        pending = [t for t in order(rater) if t not in done]
        return (pending[0] if pending else None), len(done)

    def page_error(code: int, message: str):
        return render_template("error.html", title=str(code), code=code, message=message,
                               rater=None), code

    def check_rater(rater: str) -> None:
        if not valid_rater(rater):
            abort(400, f"rater id {rater!r} is not allowed; use 1-40 letters, digits, - or _")

    def api_error(code: int, message: str):
        return jsonify(error=message), code

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def http_error(err):
        message = err.description or err.name
        if request.path.startswith("/api/"):
            return api_error(err.code, message)
        return page_error(err.code, message)

    @app.get("/favicon.ico")
    def favicon():
        return "", 204

    @app.get("/")
    def index():
        return render_template("start.html", title="Start", total=total, value="", error=None,
                               rater=None)

    @app.get("/start")
    def start():
        rater = request.args.get("rater", "").strip()
        if not valid_rater(rater):
            error = (f"The rater id {rater!r} is not allowed: use 1 to 40 letters, digits, - or _."
                     if rater else "Please enter a rater id.")
            return render_template("start.html", title="Start", total=total, value=rater[:40],
                                   error=error, rater=None), 400
        if answered(rater):
            return redirect(url_for("task_page", rater=rater, resumed=1))
        return redirect(url_for("instructions", rater=rater, step=1))

    @app.get("/r/<rater>/instructions/<int:step>")
    def instructions(rater: str, step: int):
        check_rater(rater)
        if step not in (1, 2, 3):
            abort(404, f"there is no instruction step {step}; steps are 1, 2 and 3")
        pick = request.args.get("pick")
        if step == 2 and pick is not None and pick not in SIDES:
            abort(400, f"pick must be 'left' or 'right', got {pick!r}")

        def src(kind: str) -> str:
            return url_for("example_image", kind=kind)

        return render_template(f"instructions{step}.html", title="Introduction", rater=rater,
                               src=src, example=example, pick=pick, total=total)

    @app.get("/r/<rater>/task")
    def task_page(rater: str):
        check_rater(rater)
        task_id, n_done = next_task(rater)
        if task_id is None:
            return redirect(url_for("done_page", rater=rater))
        with _transaction(conn()) as c:
            c.execute("INSERT INTO shown(rater, task_id, shown_at) VALUES (?, ?, ?) "
                      "ON CONFLICT(rater, task_id) DO UPDATE SET shown_at = excluded.shown_at",
                      (rater, task_id, _now()))

        def src(kind: str) -> str:
            return url_for("task_image", task_id=task_id, kind=kind)

        return render_template("task.html", title=f"Task {n_done + 1} of {total}", rater=rater,
                               task_id=task_id, index=n_done + 1, total=total, src=src,
                               resumed=request.args.get("resumed") == "1")

    @app.get("/r/<rater>/done")
    def done_page(rater: str):
        check_rater(rater)
        task_id, _ = next_task(rater)
        if task_id is not None:
            return redirect(url_for("task_page", rater=rater))
        declined = sum(choice == "decline" for choice in answered(rater).values())
        return render_template("done.html", title="Thank you", rater=rater, total=total,
                               declined=declined)

    @app.get("/img/<task_id>/<kind>")
    def task_image(task_id: str, kind: str):
        if task_id not in records or kind not in IMAGE_KINDS:
            abort(404, "no such image")
        return send_file(root / "images" / f"{task_id}-{kind}.png", mimetype="image/png")

    @app.get("/example/<kind>")
    def example_image(kind: str):
        if kind not in IMAGE_KINDS:
            abort(404, "no such image")
        return send_file(root / "example" / f"{kind}.png", mimetype="image/png")

    @app.post("/api/answer")
    def api_answer():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return api_error(400, "the body must be a JSON object {rater, task_id, choice} sent "
                                  "as application/json")
        keys = {"rater", "task_id", "choice"}
        if set(body) != keys:
            return api_error(400, f"the body must have exactly the keys {sorted(keys)}; missing "
                                  f"{sorted(keys - set(body))}, unknown {sorted(set(body) - keys)}")
        rater, task_id, choice = body["rater"], body["task_id"], body["choice"]
        if not valid_rater(rater):
            return api_error(400, f"rater id {rater!r} is not allowed; use 1-40 letters, "
                                  f"digits, - or _")
        if not isinstance(choice, str) or choice not in CHOICES:
            return api_error(400, f"choice {choice!r} is not allowed; use one of "
                                  f"{list(CHOICES)}")
        if not isinstance(task_id, str):
            return api_error(400, f"task_id must be a string, got {task_id!r}")
        if task_id not in records:
            return api_error(404, f"there is no task {task_id!r}")
        now = _now()
        try:
            with _transaction(conn()) as c:
                if c.execute("SELECT 1 FROM answers WHERE rater = ? AND task_id = ?",
                             (rater, task_id)).fetchone():
                    raise sqlite3.IntegrityError("answered")
                row = c.execute("SELECT shown_at FROM shown WHERE rater = ? AND task_id = ?",
                                (rater, task_id)).fetchone()
                seconds = max(0.0, now - row[0]) if row and math.isfinite(row[0]) else None
                answered_at = datetime.fromtimestamp(now, timezone.utc).isoformat(
                    timespec="milliseconds")
                c.execute("INSERT INTO answers(rater, task_id, choice, correct_side, seconds, "
                          "answered_at) VALUES (?, ?, ?, ?, ?, ?)",
                          (rater, task_id, choice, records[task_id]["correct_side"], seconds,
                           answered_at))
        except sqlite3.IntegrityError:
            return api_error(409, f"rater {rater!r} has already answered task {task_id!r}; "
                                  f"answers are final")
        nxt, n_done = next_task(rater)
        return jsonify(ok=True, answered=n_done, total=total,
                       next=url_for("task_page", rater=rater) if nxt else
                       url_for("done_page", rater=rater))

    @app.get("/api/progress")
    def api_progress():
        rater = request.args.get("rater", "")
        if not valid_rater(rater):
            return api_error(400, f"rater id {rater!r} is not allowed; use 1-40 letters, "
                                  f"digits, - or _")
        nxt, n_done = next_task(rater)
        return jsonify(rater=rater, answered=n_done, total=total, next_task=nxt)

    return app


# --------------------------------------------------------------------------------------------
# Reading the answers


def read_answers(db_path: str | os.PathLike, tasks_dir: str | os.PathLike) -> pd.DataFrame:
    """All answers of an answers database joined with their tasks.

    Parameters
    ----------
    db_path
        The SQLite file written by the app (opened read-only).
    tasks_dir
        The task folder the answers were given on (checked with :func:`validate_task_folder`).

    Returns
    -------
    pandas.DataFrame
        One row per answer, columns :data:`EXPORT_COLUMNS`, sorted by rater, then time of the
        answer. ``sample``, ``neuron``: ``int64``; ``correct``: ``bool``, ``choice ==
        correct_side`` (a decline is not correct); ``seconds``: ``float64`` (NaN where the task
        page had not been served); ``answered_at``: ISO 8601 UTC.

    Raises
    ------
    FileNotFoundError
        If ``db_path`` does not exist.
    ValueError
        If the task folder is invalid, the database has no ``answers`` table, or an answer names
        a task missing from the folder or records another correct side than the folder (the
        folder was rebuilt since).
    """
    tasks = validate_task_folder(tasks_dir)
    db = Path(db_path)
    if not db.is_file():
        raise FileNotFoundError(f"answers database {str(db)!r} does not exist")
    conn = _connect(db, read_only=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "answers" not in tables:
            raise ValueError(f"database {str(db)!r} has no table 'answers' (tables: "
                             f"{sorted(tables)})")
        rows = conn.execute(f"SELECT {', '.join(ANSWER_COLUMNS)} FROM answers").fetchall()
    finally:
        conn.close()
    answers = pd.DataFrame(rows, columns=list(ANSWER_COLUMNS))
    unknown = sorted(set(answers["task_id"]) - set(tasks["task_id"]))
    if unknown:
        raise ValueError(f"database {str(db)!r} has answers to tasks missing from "
                         f"{str(tasks_dir)!r}: {_list_some(unknown)}")
    merged = answers.merge(tasks, on="task_id", how="left", suffixes=("", "_task"),
                           validate="many_to_one")
    differ = merged[merged["correct_side"] != merged["correct_side_task"]]
    if not differ.empty:
        raise ValueError(f"database {str(db)!r} records another correct side than "
                         f"{str(tasks_dir)!r} for tasks "
                         f"{_list_some(sorted(differ['task_id'].unique()))}: the folder was "
                         f"rebuilt since the answers were given")
    merged["correct"] = (merged["choice"] == merged["correct_side"]).astype(bool)
    merged["seconds"] = pd.to_numeric(merged["seconds"], errors="raise").astype("float64")
    out = merged[list(EXPORT_COLUMNS)].sort_values(["rater", "answered_at", "task_id"])
    out = out.reset_index(drop=True)
    for column in ("sample", "neuron"):
        out[column] = out[column].astype("int64")
    return out


# --------------------------------------------------------------------------------------------
# Command line


def _build_tasks(preset: str) -> Path:
    """The task folder of ``preset``, made by ``spade_lib.study_tasks.build_tasks``."""
    from spade_lib import config
    from spade_lib.study_tasks import build_tasks

    return Path(build_tasks(config.load(preset)))


def _run_server(app: Flask, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until interrupted (Ctrl-C)."""
    server = make_server(host, port, app, threaded=True)
    print(f"Serving the study on http://{host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0: any free port), got "
                                         f"{value}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m spade_lib.study serve|export``.

    ``serve [--tasks DIR] [--db PATH] [--port 8765] [--preset cpu] [--seed 0]`` runs the app on
    ``127.0.0.1``; without ``--tasks`` the folder is ``build_tasks(config.load(preset))`` from
    ``spade_lib.study_tasks``. ``export [--tasks DIR] [--db PATH] [--preset cpu] --out CSV``
    writes :func:`read_answers` as CSV (the task folder supplies the task columns). ``--db``
    defaults to ``<tasks>/answers.sqlite``.
    """
    parser = argparse.ArgumentParser(prog="python -m spade_lib.study",
                                     description="The human-study web app (Appendix H).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the study on 127.0.0.1")
    export = sub.add_parser("export", help="write the answers joined with their tasks as CSV")
    for p in (serve, export):
        p.add_argument("--tasks", type=Path, default=None,
                       help="task folder (default: built from --preset)")
        p.add_argument("--db", type=Path, default=None,
                       help="answers database (default: <tasks>/answers.sqlite)")
        p.add_argument("--preset", default="cpu",
                       help="preset whose task folder is used when --tasks is not given")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT)
    serve.add_argument("--seed", type=int, default=0, help="seed of the per-rater task orders")
    export.add_argument("--out", type=Path, required=True, help="CSV file to write")
    args = parser.parse_args(argv)

    tasks_dir = args.tasks if args.tasks is not None else _build_tasks(args.preset)
    db = args.db if args.db is not None else Path(tasks_dir) / "answers.sqlite"
    if args.command == "serve":
        _run_server(create_app(tasks_dir, db, seed=args.seed), HOST, args.port)
        return
    table = read_answers(db, tasks_dir)
    atomic_write(args.out, lambda fh: fh.write(table.to_csv(index=False).encode("utf-8")))
    print(f"wrote {len(table)} answers to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
